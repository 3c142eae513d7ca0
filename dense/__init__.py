"""What detection/ and segmentation/ share: their config defaults, the run wrapper, the training loop."""
