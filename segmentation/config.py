"""The segmentation config tree: :func:`dense.config.dense_defaults` plus the data and model keys of this task,
defaulting to the seed's UPerNet 160k recipe on ADE20K (see configs/segmentation/)."""
from __future__ import annotations

from yacs.config import CfgNode as CN

from config import Rule, at_least, between, one_of
from dense.config import DENSE_RULES, dense_defaults

ARCHS = ("upernet", "fpn")
TEST_MODES = ("whole", "slide")


def segmentation_defaults() -> CN:
    c = dense_defaults()
    # True: ADE20K's layout (as mmsegmentation's reduce_zero_label): label value 0 is "other" and ignored, value v
    # is class v - 1. False: value v is class v, 0 included. Value 255 is ignored either way.
    c.DATA.REDUCE_ZERO_LABEL = True
    # 0: counted from the training annotations (refused when the largest value looks like a stray); otherwise
    # every label value must fit it.
    c.DATA.NUM_CLASSES = 0
    # Training images are resized to fit (long side, short side) x a random ratio from RATIO_RANGE, then cropped
    # (padded with "ignore" when smaller) to CROP_SIZE; evaluation resizes to fit SCALE itself.
    c.DATA.SCALE = (2048, 512)
    c.DATA.RATIO_RANGE = (0.5, 2.0)
    c.DATA.CROP_SIZE = 512
    # mmsegmentation's PhotoMetricDistortion of training crops (brightness, contrast, saturation, hue; see
    # segmentation/data.py), as in the seed's ADE20K pipeline.
    c.DATA.PHOTOMETRIC_DISTORTION = True
    # Evaluation: each image resized to fit DATA.SCALE x each of TEST.SCALES (and, with FLIP, mirrored too); the
    # class probabilities of every view are averaged at the label's resolution (mmsegmentation's aug_test, the
    # seed's "MS" numbers). MODE whole predicts each view at once; slide in TEST.CROP windows every TEST.STRIDE
    # pixels, averaging where they overlap (mmsegmentation's slide mode, for views larger than the crop).
    c.TEST = CN()
    c.TEST.SCALES = [1.0]
    c.TEST.FLIP = False
    c.TEST.MODE = "whole"
    c.TEST.CROP = 512
    c.TEST.STRIDE = 341
    c.MODEL.ARCH = "upernet"
    c.MODEL.DECODER_CHANNELS = 512
    # The seed's auxiliary head (mmsegmentation's FCNHead: a 3x3 convolution to AUX_CHANNELS, dropout 0.1, a 1x1
    # classifier) on backbone stage AUX_STAGE (0-3; 2: the 384-channel map of Focal-T), trained with its own
    # cross-entropy x AUX_LOSS_WEIGHT and not run at evaluation or inference (its weights stay in checkpoints).
    c.MODEL.AUX_HEAD = True
    c.MODEL.AUX_STAGE = 2
    c.MODEL.AUX_CHANNELS = 256
    c.MODEL.AUX_LOSS_WEIGHT = 0.4
    c.TRAIN.BASE_LR = 6e-5
    c.TRAIN.WEIGHT_DECAY = 0.01
    c.TRAIN.WARMUP_ITERS = 1500
    c.TRAIN.WARMUP_RATIO = 1e-6
    c.TRAIN.SCHEDULE = "poly"
    c.TRAIN.EPOCHS = 127  # 160k updates of 16 images over ADE20K's 20,210
    return c


SEGMENTATION_RULES = DENSE_RULES + (
    Rule("DATA.NUM_CLASSES", lambda value, _: 0 <= value <= 255, "must be 0 (from the data) up to 255"),
    Rule("DATA.SCALE", lambda value, _: len(value) == 2 and min(value) >= 1, "must be two sizes (long, short)"),
    Rule("DATA.RATIO_RANGE", lambda value, _: len(value) == 2 and 0 < value[0] <= value[1],
         "must be (low, high) with 0 < low <= high"),
    Rule("DATA.CROP_SIZE", lambda value, _: value >= 32 and value % 32 == 0, "must be a multiple of 32"),
    Rule("TEST.SCALES", lambda value, _: len(value) >= 1 and all(r > 0 for r in value),
         "must be one or more ratios of DATA.SCALE above 0"),
    Rule("TEST.MODE", one_of(TEST_MODES), f"must be one of {TEST_MODES}"),
    Rule("TEST.CROP", at_least(32), "must be at least 32"),
    Rule("TEST.STRIDE", lambda value, c: 1 <= value <= c.TEST.CROP, "must be from 1 up to TEST.CROP"),
    Rule("MODEL.ARCH", one_of(ARCHS), f"must be one of {ARCHS}"),
    Rule("MODEL.OUT_INDICES", lambda value, _: list(value) in ([], [0, 1, 2, 3]),
         "must be [] or [0, 1, 2, 3]: smp's decoders take all four stages"),
    Rule("DATA.BATCH_SIZE", lambda value, c: value >= 2 or c.MODEL.ARCH != "upernet" or c.EVAL_MODE,
         "must be at least 2 to train UPerNet (the batch norm after its global pooling needs two values)"),
    Rule("MODEL.DECODER_CHANNELS", at_least(1), "must be at least 1"),
    Rule("MODEL.AUX_STAGE", between(0, 3), "must be a backbone stage, 0 to 3"),
    Rule("MODEL.AUX_CHANNELS", at_least(1), "must be at least 1"),
    Rule("MODEL.AUX_LOSS_WEIGHT", lambda value, _: value > 0,
         "must be above 0 (MODEL.AUX_HEAD False turns the head off)"),
)
