"""stitch_lib — the ReStNet core: cut timm models into segments, rank stitch points by CKA,
join a large model's early layers to a small model's later layers with a small stitch layer,
fine-tune only that layer, and measure every hybrid into a catalog with its Pareto frontier."""
from .catalog import Catalog, Entry, pareto
from .cka import cka_matrix, linear_cka, minibatch_cka
from .segments import Segment, split_model
from .stitch import Hybrid, Stitch, build_hybrid, feasible_points
from .train import TrainConfig, finetune_stitch

__all__ = ["Catalog", "Entry", "Hybrid", "Segment", "Stitch", "TrainConfig", "build_hybrid",
           "cka_matrix", "feasible_points", "finetune_stitch", "linear_cka", "minibatch_cka",
           "pareto", "split_model"]
