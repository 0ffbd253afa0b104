"""An ESTIMATE of CPU time on real MTE hardware from operation counters.

Counts are facts of the run; this model is a separate, labelled estimate
whose parameters live in costmodel.toml (edit a copy and pass it with
--cost-model).  It covers the tag-related work of the VMM and the kernel,
and the stage-2 traps that logging dirty pages (and, for the tag-dirty-log
proposal, tag stores) costs; not the rest of the data path common to every
strategy (copying pages, checksums, the network)."""

import tomllib
from pathlib import Path

DEFAULT_MODEL = Path(__file__).with_name("costmodel.toml")

# counter suffix -> (model parameter, multiplier)
_TERMS = {
    "syscalls.kvm_arm_mte_copy_tags": ("syscall", 1),
    "syscalls.kvm_get_dirty_log": ("syscall", 1),
    "syscalls.kvm_get_tag_dirty_log": ("syscall", 1),
    "syscalls.prctl": ("syscall", 1),
    "el0.ldg": ("el0_tag_instruction", 1),
    "el0.stg": ("el0_tag_instruction", 1),
    "el0.st2g": ("el0_tag_instruction", 1),
    "kernel.page_tag_reads": ("kernel_page_tag_op", 1),
    "kernel.page_tag_writes": ("kernel_page_tag_op", 1),
    "kernel.page_zero_fills": ("kernel_page_zero_fill", 1),
    "kernel.tag_clears": ("kernel_tag_clear", 1),
    "bytes.tags_to_user": ("copy_byte", 1),
    "bytes.tags_from_user": ("copy_byte", 1),
    "tag_check_faults": ("tag_check_fault", 1),
    "el0.tco_switches": ("tco_switch", 1),
    # Stage-2 traps taken by a vCPU: a store to a write-protected page while
    # dirty pages are logged (every strategy; a tag store counts as a store),
    # and, under the tag-dirty-log PROPOSAL, a tag store trapped apart from
    # data stores (see docs/PROPOSALS.md for whether hardware can do that).
    "kvm.write_protect_faults": ("write_protect_fault", 1),
    "kvm.tag_access_faults": ("tag_access_fault", 1),
}
#: the parameters that price stage-2 traps, reported apart from the tag work
TRAP_PARAMS = frozenset({"write_protect_fault", "tag_access_fault"})


def load(path: str | None = None) -> dict:
    p = Path(path) if path else DEFAULT_MODEL
    with open(p, "rb") as f:
        model = tomllib.load(f)
    missing = {param for param, _ in _TERMS.values()} - set(model)
    if missing:
        raise ValueError(f"cost model {p} lacks {sorted(missing)}")
    return model


def breakdown_ms(counters: dict, model: dict, prefix: str = "") -> dict:
    """Estimated milliseconds per model parameter for counters named
    ``prefix + name`` (e.g. 'source.' or 'destination.'); parameters with no
    count are left out."""
    out: dict[str, float] = {}
    for name, (param, mult) in _TERMS.items():
        count = counters.get(prefix + name, 0)
        if count:
            out[param] = out.get(param, 0.0) + count * model[param] * mult / 1e6
    return out


def estimate_ms(counters: dict, model: dict, prefix: str = "", traps: bool | None = None) -> float:
    """Estimated milliseconds of CPU for counters named ``prefix + name``:
    everything (``traps`` None), only the stage-2 traps (True) or only the
    tag work without them (False)."""
    parts = breakdown_ms(counters, model, prefix)
    return sum(ms for param, ms in parts.items() if traps is None or (param in TRAP_PARAMS) == traps)
