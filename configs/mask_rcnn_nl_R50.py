# LazyConfig twin of mask_rcnn_nl_R50.yaml (Table 5, R50 +1 NL): detectron2's LazyConfig Mask R-CNN
# R50-FPN 1x (model zoo COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py) with one non-local block
# right before the last residual block of res4. Train it with
#   tools/lazyconfig_train_net.py --config-file configs/mask_rcnn_nl_R50.py --num-gpus 8
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from nl_detectron import add_nonlocal_blocks

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train

model.backbone.bottom_up.freeze_at = 2
# add_nonlocal_blocks inserts the blocks into the ResNet it is given and returns that ResNet.
model.backbone.bottom_up = L(add_nonlocal_blocks)(
    resnet=model.backbone.bottom_up,
    locations=[("res4", -1)],
    mode="embedded_gaussian",
    reduction=2,
    sub_sample=True,
    sub_sample_input=True,  # max-pool x before phi/g, as the authors' code (see the YAML twin)
    use_scale=True,
    norm="",
)
model.backbone.in_features = "${.bottom_up.resnet.out_features}"

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "output/mask_rcnn_nl_R50_lazy"
