"""The run configuration: a typed dataclass tree, one dataclass per concern.

Precedence is command line (``--section.key=value``) > recipe TOML (``jobs/*.toml``) > the defaults
below. Loading, overrides, type checking and the resolved-config dump live in
:mod:`pipeline.config_io`; range checks that need more than a type live in each section's
``__post_init__`` and raise :class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A user error in the run configuration; the CLI reports it on one line, without a traceback."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: must be {allowed}")


@dataclass(kw_only=True)
class RunCfg:
    """Identity and location of a run."""

    name: str = ""
    """Run name; the run directory is ``<output_dir>/<name>`` and the MLflow run carries it.
    Empty: ``<recipe file stem>-<UTC timestamp>``."""
    output_dir: str = "runs"
    """Root of the run directories and of the project's MLflow store (``<output_dir>/mlflow.db``)."""
    seed: int = 0
    """Global seed: model init, data order (with the epoch) and augmentation draw from it."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console and file log level."""

    def __post_init__(self) -> None:
        _check("/" not in self.name and self.name not in (".", ".."), "run.name", self.name,
               "a single directory name (no '/'; the run directory is <output_dir>/<name>)")


@dataclass(kw_only=True)
class ModelCfg:
    """The network, built by name through timm's registry (vitpipe's models register there)."""

    name: str = "vit_small_patch16_224"
    """Registered model name, e.g. ``vit_pico_patch4_32`` or ``swin_tiny_patch4_window7_224``."""
    num_classes: int = 0
    """Classifier outputs; 0 takes the number of classes from the dataset's ``dataset.json``."""
    drop_path_rate: float = 0.0
    """Stochastic-depth rate at the last block (linearly increasing over depth)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the model's constructor (e.g. ``{ depth = 6 }``)."""
    init_from: str = ""
    """Weights to start from (``.safetensors`` from ``vitpipe export`` / ``<run>/final/``, or a torch state
    dict); empty = random initialisation. A resumed run loads its checkpoint instead."""
    init_mode: Literal["auto", "strict", "finetune", "inflate"] = "auto"
    """How ``init_from`` is loaded: ``strict``; ``finetune`` (new classifier when the class count differs);
    ``inflate`` (also image → video: 2-D kernels repeated over time / kt); ``auto`` (whatever the shapes need)."""

    def __post_init__(self) -> None:
        _check(self.num_classes >= 0, "model.num_classes", self.num_classes, ">= 0")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "in [0, 1)")


#: StructViT video recipes (structvit.md §6.2-6.5): clip length, sampling and test views. A ``[data.video]``
#: table with ``recipe = "k400"`` starts from these values; its own keys win.
VIDEO_RECIPES: dict[str, dict[str, Any]] = {
    "k400": dict(frames=16, stride=4, sampling="dense", num_clips=4, spatial_crops=1),
    "ssv2": dict(frames=16, sampling="segment", num_clips=1, spatial_crops=3),
    "diving48": dict(frames=32, sampling="segment", num_clips=1, spatial_crops=3),
    "finegym": dict(frames=32, sampling="segment", num_clips=1, spatial_crops=3),
}
#: Recipes whose labels depend on direction (e.g. "pushing left to right"): ``data.hflip`` must be 0.
NO_FLIP_VIDEO_RECIPES = frozenset({"ssv2", "diving48", "finegym"})


@dataclass(kw_only=True)
class VideoCfg:
    """Video clips: how frames are sampled for training and which views evaluation averages."""

    recipe: Literal["", "k400", "ssv2", "diving48", "finegym"] = ""
    """Start from a named StructViT recipe's clip settings (its frames, sampling and views); the table's own
    keys override them. Empty: the defaults below."""
    frames: int = 16
    """Frames per clip ``T``."""
    stride: int = 4
    """Dense sampling: frame step ``τ`` between clip frames, in stored frames (ignored by segment sampling)."""
    sampling: Literal["dense", "segment"] = "dense"
    """``dense`` (Kinetics: ``T`` frames ``τ`` apart) or ``segment`` (SSv2/Diving-48/FineGym: one frame from
    each of ``T`` equal segments, TSN style)."""
    short_video: Literal["clamp", "loop"] = "clamp"
    """Dense sampling of a video shorter than the clip span: ``clamp`` repeats the last frame, ``loop`` wraps
    round to frame 0."""
    num_clips: int = 1
    """Evaluation: temporal clips per video (dense: evenly spaced starts; segment: offsets within segments)."""
    spatial_crops: int = 1
    """Evaluation: 1 (centre) or 3 (left/centre/right, or top/centre/bottom, along the long side)."""
    train_crop: Literal["rrc", "short_side"] = "rrc"
    """Training crop: ``rrc`` (random-resized crop with ``data.crop_scale``/``crop_ratio``) or ``short_side``
    (resize the short side to a random length in ``short_side_range``, then a random ``S × S`` crop)."""
    short_side_range: tuple[int, int] = (256, 320)
    """``short_side``: inclusive range of the resized short side (both >= ``data.img_size``)."""
    eval_short_side: int = 0
    """Evaluation: resize the short side to this before cropping; 0 means ``data.img_size``."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Resize filter (antialiased when downscaling)."""
    webm_backend: Literal["auto", "dali", "pyav"] = "auto"
    """VP9 decoder of the ``wds`` backend: ``dali``, ``pyav`` or ``auto`` (DALI when installed)."""

    def __post_init__(self) -> None:
        for key in ("frames", "stride", "num_clips"):
            _check(getattr(self, key) >= 1, f"data.video.{key}", getattr(self, key), ">= 1")
        _check(self.spatial_crops in (1, 3), "data.video.spatial_crops", self.spatial_crops, "1 or 3")
        lo, hi = self.short_side_range
        _check(0 < lo <= hi, "data.video.short_side_range", self.short_side_range, "0 < min <= max")
        _check(self.eval_short_side >= 0, "data.video.eval_short_side", self.eval_short_side, ">= 0")

    @staticmethod
    def with_recipe(table: dict[str, Any]) -> dict[str, Any]:
        """The table with its named recipe's values filled in under the table's own keys.

        Raises:
            ConfigError: For an unknown recipe name.
        """
        recipe = table.get("recipe", "")
        if recipe and recipe not in VIDEO_RECIPES:
            raise ConfigError(f"data.video.recipe = {recipe!r}: must be one of {', '.join(map(repr, VIDEO_RECIPES))}")
        return {**VIDEO_RECIPES.get(recipe, {}), **table}

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> VideoCfg:
        """Builds the section from a plain table (Python callers; recipes go through :mod:`pipeline.config_io`).

        Raises:
            ConfigError: For an unknown key or a bad value.
        """
        try:
            return cls(**cls.with_recipe(dict(table)))
        except TypeError as err:
            raise ConfigError(f"data.video: {err}") from err



@dataclass(kw_only=True)
class DataCfg:
    """Input data: shards written by ``vitpipe prep`` and the CPU augmentation applied to them."""

    path: str = ""
    """Dataset directory written by ``vitpipe prep`` (it holds ``dataset.json``)."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "val"
    """Split used for evaluation."""
    img_size: int = 224
    """Training and evaluation resolution (square); also passed to the model as ``img_size``."""
    batch_size: int = 128
    """Per-process batch size; the global batch is this × processes × gradient-accumulation steps."""
    num_workers: int = 4
    """Loader worker processes per training process (0 decodes in the training process)."""
    sampler: Literal["exact", "stream"] = "exact"
    """How training epochs are drawn (docs/data_loading.md). ``exact``: every training sample once per epoch
    across all processes (but a remainder smaller than one global batch), read by byte range in an order
    planned from ``(run.seed, epoch)`` that does not depend on the process or worker count (``vitpipe order``
    prints it); the loaders can continue an epoch on another number of processes. ``stream``: each worker reads
    whole shards sequentially through a shuffle buffer (for storage where random reads are slow); per epoch
    some samples repeat or are missed, and a change of process count restarts the epoch."""
    shuffle_shards: int = 16
    """``exact`` sampling: the epoch's shard permutation is cut into blocks of this many shards and the
    samples of each block are shuffled together; a process reads from about this many shards at a time."""
    max_open_files: int = 64
    """Shard files each reading process (loader worker, or the DALI feed) keeps open; the least recently used
    is closed first, so open files stay bounded whatever the shard count."""
    record_keys: str = ""
    """Debug: a directory where every process writes the keys of the samples it trained on, one CSV per
    epoch, ``keys-rank{R}-of{W}-epoch{E}.csv`` with the columns of ``vitpipe order --out`` (``rank,step,key``);
    empty = off."""
    shuffle_buffer: int = 2000
    """``stream`` sampling: samples held by each worker's shuffle buffer (on top of the per-epoch shard shuffle)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area range, as fractions of the image."""
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    """Random-resized-crop aspect-ratio range."""
    hflip: float = 0.5
    """Horizontal-flip probability (0 for data whose label depends on handedness, e.g. digits)."""
    eval_crop_pct: float = 0.875
    """Evaluation: resize the short side to ``img_size / eval_crop_pct``, then centre-crop."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean (0-1 scale)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation standard deviation (0-1 scale)."""
    backend: Literal["wds", "dali"] = "wds"
    """Input pipeline: ``wds`` (webdataset + PIL in DataLoader workers) or ``dali`` (NVIDIA DALI)."""
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"
    """DALI decoding device: ``gpu`` (nvJPEG / hardware decoder, ``mixed`` backend), ``cpu``, or ``auto``
    (the GPU when CUDA is available)."""
    dali_threads: int = 4
    """DALI CPU worker threads per training process."""
    dali_hw_decoder_load: float = 0.65
    """Share of JPEG decoding given to the A100/H100 hardware decoder (DALI ``hw_decoder_load``)."""
    persistent_workers: bool = True
    """Keep ``wds`` loader workers alive across epochs (no worker start-up at every epoch)."""
    resample_shards: bool = False
    """``stream`` sampling: allow fewer shards than ranks × workers by repeating shards within an epoch
    (otherwise an error)."""
    randaugment: str = ""
    """timm RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``; empty = off."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength; applied only when RandAugment is off (timm's rule)."""
    reprob: float = 0.0
    """Random-erasing probability per sample (timm ``--reprob``; on the device, after normalisation)."""
    mixup: float = 0.0
    """Mixup Beta(α, α) parameter; 0 = off (DeiT/Swin recipes: 0.8)."""
    cutmix: float = 0.0
    """CutMix Beta(α, α) parameter; 0 = off (DeiT/Swin recipes: 1.0)."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch at all when mixup or cutmix is on."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix rather than mixup when both are on."""
    on_bad_shard: Literal["error", "skip"] = "error"
    """A shard that is missing, whose size differs from ``dataset.json``, or whose samples cannot be read as
    listed (truncated, extra members): ``error`` stops training (and evaluation) with one line naming it;
    ``skip`` leaves it out with a warning, counted in the metric ``data/bad_shards``. ``vitpipe eval`` is
    always strict."""
    max_skip_fraction: float = 0.1
    """Samples that fail to decode are skipped (warnings rate-limited, counted in ``data/skipped_samples``);
    more than this fraction of a ``skip_window`` stops training with one line (a data set that does not
    decode never spins)."""
    skip_window: int = 1000
    """Samples per window of ``max_skip_fraction`` (counted per reading process)."""
    video: VideoCfg = field(default_factory=lambda: VideoCfg())
    """Video data sets: clip sampling and evaluation views (the ``[data.video]`` table). The crop size,
    crop scale/ratio, flip and normalisation of clips are the keys above (``img_size``, ``crop_scale``,
    ``crop_ratio``, ``hflip`` > 0, ``mean``, ``std``)."""

    def __post_init__(self) -> None:
        _check(self.img_size >= 8, "data.img_size", self.img_size, ">= 8")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, ">= 1")
        _check(self.sampler in ("exact", "stream"), "data.sampler", self.sampler, "one of 'exact', 'stream'")
        _check(self.shuffle_shards >= 1, "data.shuffle_shards", self.shuffle_shards, ">= 1")
        _check(self.max_open_files >= 1, "data.max_open_files", self.max_open_files, ">= 1")
        _check(self.on_bad_shard in ("error", "skip"), "data.on_bad_shard", self.on_bad_shard, "'error' or 'skip'")
        _check(0.0 <= self.max_skip_fraction <= 1.0, "data.max_skip_fraction", self.max_skip_fraction, "in [0, 1]")
        _check(self.skip_window >= 1, "data.skip_window", self.skip_window, ">= 1")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "data.crop_scale", self.crop_scale, "0 < min <= max <= 1")
        _check(0 < self.crop_ratio[0] <= self.crop_ratio[1], "data.crop_ratio", self.crop_ratio,
               "0 < min <= max")
        _check(0.0 <= self.hflip <= 1.0, "data.hflip", self.hflip, "in [0, 1]")
        _check(0.0 < self.eval_crop_pct <= 1.0, "data.eval_crop_pct", self.eval_crop_pct, "in (0, 1]")
        _check(all(s > 0 for s in self.std), "data.std", self.std, "positive")
        _check(self.dali_threads >= 1, "data.dali_threads", self.dali_threads, ">= 1")
        _check(0.0 <= self.dali_hw_decoder_load <= 1.0, "data.dali_hw_decoder_load", self.dali_hw_decoder_load,
               "in [0, 1]")
        _check(not self.randaugment or self.randaugment.startswith("rand-"), "data.randaugment", self.randaugment,
               "empty or a timm RandAugment string such as 'rand-m9-mstd0.5-inc1'")
        for key in ("color_jitter", "mixup", "cutmix"):
            _check(getattr(self, key) >= 0.0, f"data.{key}", getattr(self, key), ">= 0")
        for key in ("reprob", "mixup_prob", "mixup_switch_prob"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"data.{key}", getattr(self, key), "in [0, 1]")
        if isinstance(self.video, dict):  # built in Python: DataCfg(video={"recipe": "ssv2", ...})
            self.video = VideoCfg.from_table(self.video)
        v = self.video
        _check(self.img_size <= v.short_side_range[0], "data.video.short_side_range",
               v.short_side_range, f"img_size ({self.img_size}) <= min <= max")
        _check(v.eval_short_side == 0 or v.eval_short_side >= self.img_size, "data.video.eval_short_side",
               v.eval_short_side, f"0 or >= data.img_size ({self.img_size})")
        _check(not (v.recipe in NO_FLIP_VIDEO_RECIPES and self.hflip > 0), "data.hflip", self.hflip,
               f"0 with data.video.recipe = {v.recipe!r} (its labels depend on direction; the paper does not flip)")


@dataclass(kw_only=True)
class OptimCfg:
    """Optimizer (AdamW with decoupled weight decay; no decay on norms, biases and tokens)."""

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 5e-4
    """Peak learning rate (after warm-up), before batch scaling (see ``lr_base_batch``)."""
    lr_base_batch: int = 0
    """If > 0, the peak LR is ``lr × global_batch / lr_base_batch`` (DeiT: 5e-4 at 512)."""
    weight_decay: float = 0.05
    """Decoupled weight decay for weight matrices and kernels."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (SGD uses ``betas[0]`` as momentum)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    layer_decay: float = 0.0
    """Layer-wise LR decay: block i of L trains at ``lr × layer_decay^(L - i)`` (BEiT/ConvNeXt); 0 disables it."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights, evaluated beside the live weights; 0 disables it."""

    def __post_init__(self) -> None:
        _check(0 <= self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "in [0, 1]")
        _check(0 <= self.ema_decay < 1, "optim.ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(self.lr_base_batch >= 0, "optim.lr_base_batch", self.lr_base_batch, ">= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "in [0, 1)")
        _check(self.clip_grad >= 0, "optim.clip_grad", self.clip_grad, ">= 0")


@dataclass(kw_only=True)
class LossCfg:
    """Training objective."""

    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy targets."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing", self.label_smoothing, "in [0, 1)")


@dataclass(kw_only=True)
class ScheduleCfg:
    """Training length and the per-step learning-rate schedule (linear warm-up, then cosine)."""

    epochs: int = 300
    """Training epochs; an epoch is ``train samples // global batch`` steps."""
    warmup_epochs: float = 5.0
    """Linear warm-up length from ``warmup_lr`` to the peak LR (fractions allowed)."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    max_steps: int = 0
    """If > 0, stop after this many optimizer steps (for smoke runs); the schedule still spans ``epochs``."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "schedule.epochs", self.epochs, ">= 1")
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(self.min_lr >= 0, "schedule.min_lr", self.min_lr, ">= 0")
        _check(self.max_steps >= 0, "schedule.max_steps", self.max_steps, ">= 0")


@dataclass(kw_only=True)
class EngineCfg:
    """The distributed engine seam (accelerate); the model never sees it."""

    backend: Literal["ddp", "deepspeed"] = "ddp"
    """Data-parallel wrapper: ``ddp`` (DistributedDataParallel) or ``deepspeed`` (ZeRO, see ``zero_stage``)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ weights)."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states in CPU memory (ZeRO stage >= 1)."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """Autocast precision of forward and backward; master weights stay fp32."""
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: ``auto`` picks NCCL on GPUs and gloo on CPUs."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass (the model's ``set_grad_checkpointing`` hook)."""
    channels_last: bool = False
    """Channels-last memory format for weights and inputs (faster convolutions on GPUs)."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (inductor) when the engine wraps it."""
    cpu_threads: int = 0
    """Intra-op threads of each training process on CPU; 0 = the cores left per process after its loader
    workers (at least 1), unless ``OMP_NUM_THREADS`` is set. Torch's default (all cores) oversubscribes a
    CPU machine whose cores also run the loader workers."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device in the training precision, for MFU (e.g. 989 for H100 bf16); 0: not logged."""

    def __post_init__(self) -> None:
        _check(self.grad_accum_steps >= 1, "engine.grad_accum_steps", self.grad_accum_steps, ">= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", self.zero_stage, "0, 1, 2 or 3")


@dataclass(kw_only=True)
class EvalCfg:
    """Periodic evaluation on the validation split (top-1 / top-5)."""

    every_epochs: int = 1
    """Evaluate after every N epochs and at the end; 0 evaluates only at the end."""
    every_steps: int = 0
    """Also evaluate after every N optimizer steps (for runs whose epochs are long or few); 0 = off."""
    batch_size: int = 0
    """Per-process evaluation batch; 0 uses ``data.batch_size``."""

    def __post_init__(self) -> None:
        _check(self.every_epochs >= 0, "eval.every_epochs", self.every_epochs, ">= 0")
        _check(self.every_steps >= 0, "eval.every_steps", self.every_steps, ">= 0")
        _check(self.batch_size >= 0, "eval.batch_size", self.batch_size, ">= 0")


@dataclass(kw_only=True)
class CheckpointCfg:
    """Checkpoints, written atomically under ``<run dir>/checkpoints``."""

    every_steps: int = 0
    """Save every N optimizer steps; 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many most recent step checkpoints."""
    resume: bool = True
    """Resume automatically from the run directory's latest checkpoint when there is one."""
    preempt_timeout_s: float = 300.0
    """After SIGUSR1/SIGTERM, exit (status 75) at the latest this many seconds later, checkpoint or not."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, ">= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, ">= 1")
        _check(self.preempt_timeout_s > 0, "checkpoint.preempt_timeout_s", self.preempt_timeout_s, "> 0")


@dataclass(kw_only=True)
class TrackingCfg:
    """MLflow tracking: one run per training job, created by rank 0."""

    enabled: bool = True
    """Track the run in MLflow."""
    uri: str = ""
    """Tracking URI; empty uses the project's SQLite store ``<run.output_dir>/mlflow.db``."""
    experiment: str = "vitpipe"
    """MLflow experiment name."""
    log_every_steps: int = 10
    """Log training metrics every N optimizer steps."""
    system_metrics_s: float = 10.0
    """Sampling interval of the system metrics (``system/…``: CPU, memory, disk, network, GPU, from MLflow's
    monitors); sampled by the tracking logger's own thread and queued like every record, so they go on
    through a tracking outage and are delivered after it; 0 turns them off."""
    pictures: int = 2
    """Validation inputs drawn with the model's own visualisation (StructViT attention, image or video;
    FilterViT masks) at every evaluation and logged to MLflow's image panel as ``pictures/sample<i>``, one
    image per step; 0 turns it off. Models without pictures log none (one info line says why)."""
    register_model: bool = False
    """Register the final export as a new version of the registered model ``<experiment>-<model.name>`` in
    MLflow's model registry (the tracking store's), with the export's facts as version tags."""

    def __post_init__(self) -> None:
        _check(self.log_every_steps >= 1, "tracking.log_every_steps", self.log_every_steps, ">= 1")
        _check(self.system_metrics_s >= 0, "tracking.system_metrics_s", self.system_metrics_s, ">= 0")
        _check(self.pictures >= 0, "tracking.pictures", self.pictures, ">= 0")


@dataclass(kw_only=True)
class JobCfg:
    """A whole run: one field per section of a recipe TOML."""

    run: RunCfg = field(default_factory=RunCfg)
    """Identity and location."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """The network."""
    data: DataCfg = field(default_factory=DataCfg)
    """Shards and augmentation."""
    optim: OptimCfg = field(default_factory=OptimCfg)
    """Optimizer."""
    loss: LossCfg = field(default_factory=LossCfg)
    """Objective."""
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    """Length and learning-rate schedule."""
    engine: EngineCfg = field(default_factory=EngineCfg)
    """Distributed engine."""
    eval: EvalCfg = field(default_factory=EvalCfg)
    """Evaluation."""
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    """Checkpointing."""
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    """Experiment tracking."""
