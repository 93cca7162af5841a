"""iso_lightning: networks whose layers grow and shrink while they train, without changing their function."""

from iso_lightning._version import __version__
from iso_lightning.activations import LENGTH_MODES, IsotropicActivation
from iso_lightning.axis import AxisTransform, DenseRotation, Extension, HouseholderRotation, Selection
from iso_lightning.callback import DynamicTopologyCallback
from iso_lightning.checkpointing import latest_valid_checkpoint
from iso_lightning.convert import convert, declare_space
from iso_lightning.datamodules import (
    DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
)
from iso_lightning.errors import NonFiniteError
from iso_lightning.ffn import IsotropicFFN
from iso_lightning.functional import PROFILES, isotropic, isotropic_with_scale, radial_scale
from iso_lightning.gpt import CharGPT
from iso_lightning.layers import (
    INITS,
    PSI_MODES,
    IsoConv2d,
    IsoLinear,
    IsotropicConvNet,
    IsotropicMLP,
    IsotropicNetwork,
)
from iso_lightning.linalg import left_basis
from iso_lightning.mixin import IsotropicModuleMixin
from iso_lightning.models import IsotropicClassifier
from iso_lightning.operations import SparsifyReport, SurgeryReport
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
from iso_lightning.providers import NeuronSpaceProvider, find_spaces
from iso_lightning.spaces import Binding, NeuronSpace, Role
from iso_lightning.text import TextDataModule
from iso_lightning.topology import TOPOLOGY_KEY, load_state_dict_resized

__all__ = [
    "DATAMODULES",
    "INITS",
    "LENGTH_MODES",
    "PROFILES",
    "PSI_MODES",
    "TOPOLOGY_KEY",
    "AxisTransform",
    "Binding",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CharGPT",
    "CompositePolicy",
    "DenseRotation",
    "DynamicTopologyCallback",
    "Extension",
    "FashionMNISTDataModule",
    "HouseholderRotation",
    "ImageDataModule",
    "IsoConv2d",
    "IsoLinear",
    "IsotropicActivation",
    "IsotropicClassifier",
    "IsotropicConvNet",
    "IsotropicFFN",
    "IsotropicMLP",
    "IsotropicModuleMixin",
    "IsotropicNetwork",
    "LossPlateauPolicy",
    "MNISTDataModule",
    "NeuronSpace",
    "NeuronSpaceProvider",
    "NonFiniteError",
    "OptimizerRule",
    "ParameterBudgetPolicy",
    "PolicyContext",
    "Role",
    "ScaffoldPolicy",
    "Selection",
    "SpaceInfo",
    "SparsifyReport",
    "StateRemapper",
    "SurgeryReport",
    "TextDataModule",
    "TopologyPolicy",
    "UnsupportedOptimizerError",
    "WidthSchedulePolicy",
    "__version__",
    "apply_decision",
    "convert",
    "declare_space",
    "describe",
    "find_spaces",
    "isotropic",
    "isotropic_with_scale",
    "latest_valid_checkpoint",
    "left_basis",
    "load_state_dict_resized",
    "radial_scale",
    "register_optimizer_rule",
]
