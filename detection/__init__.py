"""Object detection and instance segmentation with Focal Transformer backbones: torchvision's Mask R-CNN and
RetinaNet over an FPN of the four stage maps, COCO-layout data, COCO evaluation with pycocotools."""
