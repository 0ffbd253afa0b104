"""An ESTIMATE of CPU time on real MTE hardware from operation counters.

Counts are facts of the run; this model is a separate, labelled estimate
whose parameters live in costmodel.toml (edit a copy and pass it with
--cost-model).  It covers the tag-related work of the VMM and the kernel,
not the data path common to every strategy."""

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
}


def load(path: str | None = None) -> dict:
    p = Path(path) if path else DEFAULT_MODEL
    with open(p, "rb") as f:
        model = tomllib.load(f)
    missing = {param for param, _ in _TERMS.values()} - set(model) - {"write_protect_fault"}
    if missing:
        raise ValueError(f"cost model {p} lacks {sorted(missing)}")
    return model


def estimate_ms(counters: dict, model: dict, prefix: str = "") -> float:
    """Estimated milliseconds of tag-related CPU for counters named
    ``prefix + name`` (e.g. 'source.' or 'destination.')."""
    total_ns = 0.0
    for name, (param, mult) in _TERMS.items():
        total_ns += counters.get(prefix + name, 0) * model[param] * mult
    return total_ns / 1e6
