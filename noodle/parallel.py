"""Processes and model wrapping: the one place that knows whether a run spans several
processes (torchrun) and how the model is prepared for the training step.

One process: the model itself, compiled on CUDA. Several (torchrun sets RANK, WORLD_SIZE
and LOCAL_RANK): a process group (NCCL on CUDA, gloo elsewhere), one process per GPU, each
taking its share of every global batch, and the model either replicated with
DistributedDataParallel (its gradients averaged in the backward pass) or, with FSDP,
sharded with `fully_shard` block by block: parameters, gradients and optimizer state split
over the processes, each block gathered only while it computes. An FSDP model is built on
the meta device and materialised shard by shard, so that no process ever holds it whole.

Whatever the wrapping, files hold whole tensors (`gathered`, `place`): a run saved by N
processes resumes on M, sharded or not.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from noodle.batching import Batch, share_of
from noodle.config import LoraSettings, ModelConfig
from noodle.device import HostCopy
from noodle.errors import STOP_SIGNALS, Interrupted, NoodleError, UsageError
from noodle.footprint import (
    MemoryNeed,
    available_memory,
    require_memory,
    size_text,
    training_need,
)
from noodle.loss import IGNORE
from noodle.model import NoodleModel
from noodle.progress import Reporter
from noodle.train.settings import TrainSettings

# NVLink multicast (NVLS) off: the GPU machines' operators require it, since a program using
# it can put a host's shared GPUs out of service. Set wherever an NCCL process group starts,
# unless the environment says otherwise.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# Processes wait this long for each other's host work (tokenizing a corpus into the shared
# cache, writing the resume state), far longer than a collective of the training step may.
HOST_WAIT = timedelta(hours=6)


def stream_seed(seed: int, rank: int) -> int:
    """An independent random stream for each process of a run (dropout, initialisation of
    shards), reproducible from the run's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False
    activation_checkpointing: bool = False
    # The gloo group for waiting on host work; set once the processes are connected.
    host_group: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_environment(
        cls, fsdp: bool = False, activation_checkpointing: bool = False
    ) -> Parallel:
        """The processes of this run, from the variables torchrun sets."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            fsdp=fsdp,
            activation_checkpointing=activation_checkpointing,
        )

    @property
    def distributed(self) -> bool:
        """Whether this run has a process group: several processes, or FSDP (which needs
        one even alone)."""
        return self.world_size > 1 or self.fsdp

    @property
    def is_main(self) -> bool:
        """The process that writes files, logs and progress."""
        return self.rank == 0

    @property
    def samples(self) -> bool:
        """Whether this process ends a run with a sample of the best model's text: the
        first one, unless the model is sharded (it may not fit one device)."""
        return self.is_main and not self.fsdp

    def description(self) -> str:
        """How the run is spread, for its opening line: nothing for one process."""
        if not self.distributed:
            return ""
        how = "FSDP" if self.fsdp else "DDP"
        return f" | {self.world_size} process{'es' if self.world_size > 1 else ''} ({how})"

    # -- checks and set-up ------------------------------------------------------------------

    def check(self, batch_size: int, grad_accum: int, optimizer: str) -> None:
        """Refuse, before anything is read or written, a global batch that the processes and
        micro-batches cannot share evenly, and Muon on sharded matrices."""
        parts = self.batch_parts(grad_accum)
        if batch_size % parts:
            shared = f"{self.world_size} processes" if self.world_size > 1 else ""
            split = f"{grad_accum} micro-batches" if grad_accum > 1 else ""
            over = " × ".join(part for part in (shared, split) if part)
            raise UsageError(
                f"--batch-size {batch_size} does not divide over {over}: each takes an equal "
                f"share of the global batch; use a multiple of {parts}"
            )
        if self.fsdp and optimizer == "muon":
            raise UsageError(
                "--optimizer muon cannot train a sharded (FSDP) model: its Newton-Schulz "
                "step orthogonalises whole matrices, and FSDP gives each process a slice of "
                "each; use --optimizer adamw with FSDP, or Muon without --fsdp"
            )

    def batch_parts(self, grad_accum: int) -> int:
        """How many parts a global batch is split into: a share per process, each in
        `grad_accum` micro-batches (a part is what a process holds at a time)."""
        return self.world_size * grad_accum

    def fit_memory(
        self,
        config: ModelConfig,
        name: str,
        settings: TrainSettings,
        amp_dtype: torch.dtype,
        device: torch.device,
        reporter: Reporter,
        adapters: LoraSettings | None = None,
    ) -> Parallel:
        """This run as it trains `config` (called `name` in messages; through LoRA
        `adapters`, if given) with the batch, micro-batches and optimizer of `settings`:
        sharded when a GPU would not hold it whole (see `shard_if_needed`), and refused
        where this process's device cannot hold its share (see `footprint`): of the weights
        and their state, or of the frozen weights and the adapters', and a micro-batch's
        activations."""
        parts = self.batch_parts(settings.grad_accum)
        activation_bytes = torch.finfo(amp_dtype).bits // 8

        def need_for(candidate: ModelConfig, shards: int) -> MemoryNeed:
            return training_need(
                candidate,
                settings.batch_size // parts,
                activation_bytes,
                shards,
                self.activation_checkpointing,
                parts,
                adapters,
            )

        available = available_memory(device)
        whole = need_for(config, 1).total
        fitted = self.shard_if_needed(whole, available, settings.optimizer, device, reporter)
        shards = fitted.world_size if fitted.fsdp else 1
        require_memory(
            config, lambda candidate: need_for(candidate, shards), name, device, available
        )
        return fitted

    def shard_if_needed(
        self,
        whole_need: int,
        available: int | None,
        optimizer: str,
        device: torch.device,
        reporter: Reporter,
    ) -> Parallel:
        """This run with FSDP turned on when a GPU's `available` bytes would not hold the
        `whole_need` of training the model unsharded, and there are several GPUs to share
        it. The processes decide together: their GPUs' free memory may differ a little, and
        they must all shard or none."""
        if self.fsdp or self.world_size == 1 or device.type != "cuda":
            return self
        if not self.any(available is not None and whole_need > available, device):
            return self
        why = (
            f"the model, its optimizer state and a micro-batch need {size_text(whole_need)}, "
            f"and a GPU has {size_text(available)} free"
        )
        if optimizer == "muon":
            raise UsageError(
                f"{why}: the model must be sharded (FSDP), and Muon orthogonalises whole "
                "matrices, which sharding splits; use --optimizer adamw"
            )
        reporter.info(f"{why}: sharding it over {self.world_size} processes (FSDP)")
        return replace(self, fsdp=True)

    @contextlib.contextmanager
    def processes(self, device: torch.device) -> Iterator[Parallel]:
        """Connect the processes of this run for the duration of the block (nothing to do
        for one process without FSDP); yields this run, connected."""
        if not self.distributed:
            yield self
            return
        if device.type == "cuda":
            for name, value in MULTICAST_OFF.items():
                os.environ.setdefault(name, value)
            backend = "nccl"
        else:
            backend = "gloo"
        if self.world_size > 1:  # torchrun's variables say where the processes meet
            if "MASTER_ADDR" not in os.environ:
                raise NoodleError(
                    f"WORLD_SIZE is {self.world_size} but MASTER_ADDR is not set: start the "
                    "processes of a run with torchrun"
                )
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # one process asked for FSDP: a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        connected = replace(self, host_group=dist.new_group(backend="gloo", timeout=HOST_WAIT))
        try:
            yield connected
        except Interrupted:
            dist.destroy_process_group()  # a stop every process agreed on: all are here
            raise
        # Any other failure leaves the group as it is: the other processes may be waiting
        # in a collective, which tearing it down could wait for too; torchrun ends them.
        dist.destroy_process_group()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on each machine's first process before the others: for work whose
        result the others then reuse, e.g. the corpus tokenized into the cache."""
        first = self.local_rank == 0
        if self.distributed and not first:
            dist.barrier(group=self.host_group)
        yield
        if self.distributed and first:
            dist.barrier(group=self.host_group)

    def wait_for_all(self) -> None:
        """Return once every process got here (e.g. the first one's files are written)."""
        if self.distributed:
            dist.barrier(group=self.host_group)

    def seed_streams(self, seed: int) -> None:
        """Give each process of a run its own random stream (dropout): they would all draw
        the same masks otherwise. One process keeps the stream it has."""
        if self.distributed:
            torch.manual_seed(stream_seed(seed, self.rank))

    # -- the model ----------------------------------------------------------------------------

    def build_model(
        self,
        config: ModelConfig,
        device: torch.device,
        seed: int,
        amp_dtype: torch.dtype,
        compile_mode: str | None,
        weights: Mapping[str, torch.Tensor] | None = None,
        adapt: Callable[[NoodleModel], None] | None = None,
    ) -> NoodleModel:
        """A model to train: initialised from `seed`, or with `weights` (whole tensors, read
        only by the first process under FSDP). Under FSDP it is sharded from the meta
        device on, its blocks compiled (with `compile_mode` set) and checkpointed first.
        `adapt` changes the model built, before any of that (e.g. adds LoRA adapters, whose
        values `weights` then holds too)."""
        if not self.fsdp:
            torch.manual_seed(seed)
            model = NoodleModel(config)
            if adapt is not None:
                adapt(model)
            if weights is not None:
                self.load_state(model, weights, weights.__getitem__)
            self.seed_streams(seed)
            return model.to(device)
        with torch.device("meta"):
            model = NoodleModel(config)
        if adapt is not None:
            adapt(model)
        self.wrap_blocks(model, compile_mode)
        self.shard(model, device, amp_dtype)
        model.to_empty(device=device)
        # On CUDA, DTensor's random-number tracker draws every shard from one stream; on
        # other devices (where it warns that it cannot) each process draws its shards from
        # a stream of its own.
        torch.manual_seed(stream_seed(seed, self.rank))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "DTensor random operators", UserWarning)
            model.reset_parameters()
        if weights is not None:
            self.load_state(model, weights, weights.__getitem__)
        self.seed_streams(seed)
        return model

    def wrap_blocks(self, model: NoodleModel, compile_mode: str | None) -> None:
        """Activation checkpointing and, for FSDP, compiling, block by block (in place:
        parameter names and the state dict stay those of the plain model)."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for index, block in enumerate(model.blocks):
            if self.activation_checkpointing:
                # The wrapper's state-dict hooks keep the block's names unchanged.
                block = checkpoint_wrapper(block)
                model.blocks[index] = block
            if self.fsdp and compile_mode is not None:
                block.compile()  # FSDP's hooks run between blocks, outside compiled code

    def shard(self, model: NoodleModel, device: torch.device, amp_dtype: torch.dtype) -> None:
        """fully_shard each block, then the rest (embedding, final norm, output layer), over
        all processes; computing in `amp_dtype` (FSDP's mixed precision: parameters are
        gathered in it) with gradients reduced in float32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (self.world_size,))
        policy = MixedPrecisionPolicy()
        if amp_dtype != torch.float32:
            policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    def prepare_model(self, model: nn.Module, compile_mode: str | None) -> nn.Module:
        """The module the training step calls. One process: `model` itself, or compiled
        (sharing its parameters, so saving goes through `checkpoint.unwrap`). Several:
        wrapped in DistributedDataParallel, then compiled; FSDP's model was sharded and its
        blocks compiled by `build_model`.

        Compiled without CUDA graphs when distributed: they do not hold FSDP's hooks, and
        with DistributedDataParallel they are known to break evaluation after training."""
        if self.fsdp:
            return model
        self.wrap_blocks(model, None)
        if not self.distributed:
            return model if compile_mode is None else torch.compile(model, mode=compile_mode)
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        return wrapped if compile_mode is None else torch.compile(wrapped)

    @contextlib.contextmanager
    def gradient_sync(self, step_model: nn.Module, sync: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: without `sync`, gradients only
        accumulate locally (DistributedDataParallel's no_sync), to be averaged with the last
        micro-batch's. FSDP reduces each micro-batch's gradients to their shards at once:
        keeping them unsharded would cost a whole model's worth of memory."""
        from torch.nn.parallel import DistributedDataParallel

        module = step_model
        while not isinstance(module, DistributedDataParallel) and hasattr(module, "_orig_mod"):
            module = module._orig_mod
        if sync or not isinstance(module, DistributedDataParallel):
            yield
            return
        with module.no_sync():
            yield

    # -- what the training step agrees on -----------------------------------------------------

    def step_shares(
        self, targets: list[torch.Tensor], received: int | None, device: torch.device
    ) -> tuple[list[torch.Tensor | float | None], HostCopy | None]:
        """How much each micro-batch's mean loss weighs in the step's loss, given the
        micro-batches' (host) targets, and the stop flags the processes agree on.

        The step's loss is the mean over every predicted token of the global batch, on all
        processes and micro-batches together (not a mean of their means, which would weigh
        a fine-tuning example by the length of its neighbours' responses). Processes average
        their gradients, so a micro-batch's weight is its predicted tokens × processes /
        all predicted tokens. One process with one micro-batch: None (the loss as it is).

        With several processes one all-reduce carries the token counts and, piggy-backed,
        how many processes caught each signal (see `stop_signal`)."""
        counts = [int((micro != IGNORE).sum()) for micro in targets]
        if not self.distributed:
            total = max(sum(counts), 1)
            return ([None] if len(counts) == 1 else [c / total for c in counts]), None
        caught = [int(received == signum) for signum in STOP_SIGNALS]
        host = torch.tensor([*counts, *caught, sum(counts)], dtype=torch.float64)
        if device.type == "cuda":
            host = host.pin_memory()
        agreed = host.to(device, non_blocking=True)
        dist.all_reduce(agreed[len(counts) :])
        shares = agreed[: len(counts)] * self.world_size / agreed[-1].clamp(min=1)
        # Copied to the host now, behind the all-reduce and ahead of the step's work, so that
        # reading the flags after the step waits for the all-reduce alone.
        return list(shares.float()), HostCopy(agreed[len(counts) : -1])

    def stop_signal(self, agreed: HostCopy | None, received: int | None) -> int | None:
        """The signal every process stops for after this step, or None: with several
        processes, what `step_shares` agreed on (a signal caught by any of them, read back
        once the step's work is queued); alone, the signal received."""
        if agreed is None:
            return received
        caught = [
            signum for signum, count in zip(STOP_SIGNALS, agreed.tolist(), strict=True) if count
        ]
        return caught[-1] if caught else None

    def step_loss(self, weighted_sum: torch.Tensor) -> torch.Tensor:
        """The step's loss from this process's sum of weighted micro-batch losses (see
        `step_shares`): the same, exact global mean on every process, so that the
        non-finite guard skips a step everywhere or nowhere."""
        if not self.distributed:
            return weighted_sum
        summed = weighted_sum.clone()
        dist.all_reduce(summed)
        return summed / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is set on any process (e.g. a save that is due by one's clock)."""
        if not self.distributed:
            return flag
        value = torch.tensor(float(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)

    def rows(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """This process's share of the rows of each batch (possibly none, for a batch with
        fewer rows than processes): every process gets as many batches."""
        for batch in batches:
            if not self.distributed:
                yield batch
                continue
            yield tuple(share_of(tensor, self.rank, self.world_size) for tensor in batch)

    def mean(self, total: torch.Tensor, count: torch.Tensor) -> float:
        """total / count, each summed over the processes first."""
        if self.distributed:
            both = torch.stack([total.double(), count.double()])
            dist.all_reduce(both)
            total, count = both[0], both[1]
        return float(total) / max(int(count), 1)

    # -- whole tensors in files -------------------------------------------------------------

    def gathered(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """`tensors` whole, one at a time, on the process that writes (the first; the others
        get nothing). A sharded tensor is gathered from all processes, so every process
        must run through this, in the same order."""
        from torch.distributed.tensor import DTensor

        for name, tensor in tensors.items():
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            if self.is_main:
                yield name, tensor

    def place(self, load: Callable[[], torch.Tensor], like: torch.Tensor | None) -> torch.Tensor:
        """A saved whole tensor (`load` reads it) laid out like `like`: sharded as it is, the
        first process reading and scattering it; otherwise as read."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(like, DTensor):
            return load()
        local = like.to_local()
        if self.is_main:
            whole = load().to(device=local.device, dtype=like.dtype)
        else:  # only its shape counts: the first process's data is scattered
            whole = torch.empty(like.shape, dtype=like.dtype, device=local.device)
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=0)

    def load_state(
        self, model: nn.Module, names: Iterable[str], load: Callable[[str], torch.Tensor]
    ) -> None:
        """Load whole saved tensors into `model` (sharded or not): its state dict's `names`,
        each read by `load(name)` where needed; the rest of its state stays as it is."""
        current = model.state_dict()
        unknown = [name for name in names if name not in current]
        if unknown:
            raise ValueError(f"the model has no {unknown[0]}")
        model.load_state_dict(
            {name: self.place(lambda name=name: load(name), current[name]) for name in names},
            strict=False,
        )

    def rng_states(self, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's random-number states, on the first process: its own as `own`'s
        names (as one process saves them), process r's as `rank{r}.NAME`."""
        if not self.distributed or self.world_size == 1:
            return own
        everyone: list[dict[str, torch.Tensor]] | None = (
            [{} for _ in range(self.world_size)] if self.is_main else None
        )
        dist.gather_object(own, everyone, dst=0, group=self.host_group)
        if not self.is_main:
            return {}
        states = dict(own)
        for rank, theirs in enumerate(everyone[1:], start=1):
            states.update({f"rank{rank}.{name}": value for name, value in theirs.items()})
        return states

    def own_rng_name(self, name: str) -> str:
        """Where this process's state `name` is among `rng_states`' names."""
        return name if self.is_main else f"rank{self.rank}.{name}"


def replicated_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a value that is the same on every process: norms of sharded
    gradients come back as replicated DTensors."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
