"""iso_lightning: networks whose layers grow and shrink while they train, without changing their function."""

from iso_lightning._version import __version__
from iso_lightning.activations import LENGTH_MODES, IsotropicActivation
from iso_lightning.axis import AxisTransform, DenseRotation, Extension, HouseholderRotation, Selection
from iso_lightning.callback import DynamicTopologyCallback
from iso_lightning.datamodules import (
    DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
)
from iso_lightning.functional import PROFILES, isotropic, isotropic_with_scale, radial_scale
from iso_lightning.layers import (
    INITS,
    PSI_MODES,
    IsoConv2d,
    IsoLinear,
    IsotropicConvNet,
    IsotropicMLP,
    IsotropicNetwork,
)
from iso_lightning.mixin import TOPOLOGY_KEY, IsotropicModuleMixin, find_networks
from iso_lightning.models import IsotropicClassifier
from iso_lightning.optim import OptimizerRule, StateRemapper, UnsupportedOptimizerError, register_optimizer_rule
from iso_lightning.policies import (
    CompositePolicy,
    LossPlateauPolicy,
    ParameterBudgetPolicy,
    PolicyContext,
    ScaffoldPolicy,
    SpaceInfo,
    TopologyPolicy,
    WidthSchedulePolicy,
    apply_decision,
    describe,
)
from iso_lightning.spaces import Binding, NeuronSpace
from iso_lightning.surgery import NonFiniteError, SparsifyReport, SurgeryReport, left_basis

__all__ = [
    "INITS",
    "LENGTH_MODES",
    "PROFILES",
    "PSI_MODES",
    "DATAMODULES",
    "TOPOLOGY_KEY",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "IsotropicClassifier",
    "MNISTDataModule",
    "AxisTransform",
    "DynamicTopologyCallback",
    "IsotropicModuleMixin",
    "find_networks",
    "CompositePolicy",
    "LossPlateauPolicy",
    "ParameterBudgetPolicy",
    "PolicyContext",
    "ScaffoldPolicy",
    "SpaceInfo",
    "TopologyPolicy",
    "WidthSchedulePolicy",
    "apply_decision",
    "describe",
    "Binding",
    "DenseRotation",
    "Extension",
    "HouseholderRotation",
    "IsoConv2d",
    "IsoLinear",
    "IsotropicActivation",
    "IsotropicConvNet",
    "IsotropicMLP",
    "IsotropicNetwork",
    "NeuronSpace",
    "NonFiniteError",
    "OptimizerRule",
    "Selection",
    "SparsifyReport",
    "StateRemapper",
    "SurgeryReport",
    "UnsupportedOptimizerError",
    "__version__",
    "isotropic",
    "isotropic_with_scale",
    "left_basis",
    "radial_scale",
    "register_optimizer_rule",
]
