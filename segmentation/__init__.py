"""Semantic segmentation with Focal Transformer encoders: smp's UPerNet and FPN, ADE20K-layout data, mIoU."""
