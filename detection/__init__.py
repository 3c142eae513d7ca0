"""Object detection and instance segmentation with Focal Transformer backbones: torchvision's Mask R-CNN,
RetinaNet and FCOS over an FPN of the stage maps, COCO-layout data, COCO evaluation with pycocotools."""
