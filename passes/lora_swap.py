"""`lora-swap` — hot-swap: replace a named adapter's weights by those of a PEFT folder, keeping the program.

    lora-swap{name=a,adapter=DIR}      A, B (and DoRA m) of adapter a ← DIR's on every layer holding a; same layers
                                       and shapes (ranks) required; a different scale s' is folded into B
                                       (B ← B'·s'/s), so the graph's constants stay as they are

Only tensors change, never the graph (PEFT's `hotswap_adapter`, which spares torch.compile a recompilation). Without a pass: `rewriter.lora_runtime.hotswap(program, "a", DIR)` or
`result.swap_adapter("a", DIR)` copy into the program's tensors in place, no re-export; the CLI does the same for
a .pt2 whose pipeline is only lora-swap / lora-select (`rewrite in.pt2 --pass "lora-swap{…}" -o out.pt2`).
Contract: semantic (new adapter weights change the function on purpose).
"""
from __future__ import annotations

from dataclasses import dataclass

from rewriter.adapters import DEFAULT, LORA_OPS, check_name
from rewriter.errors import UserError
from rewriter.lora_runtime import hotswap
from rewriter.pass_base import Contract, Pass


@dataclass(frozen=True)
class LoraSwapPass(Pass):
    name = "lora-swap"
    contract = Contract.SEMANTIC
    target_ops = LORA_OPS
    summary = "hot-swap a named adapter's weights from a PEFT folder (same layers and ranks, graph unchanged)"
    option_keys = {"adapter_name": "name"}

    adapter_name: str = DEFAULT      # spec key `name`
    adapter: str = ""

    def __post_init__(self):
        check_name(self.adapter_name)

    def run(self, ctx) -> None:
        for layer in self._swap(ctx.gm, in_place=False):
            ctx.site(layer, adapter=self.adapter_name, source=self.adapter)

    def apply_saved(self, program) -> list[str]:
        """The swap on a loaded ExportedProgram, in place (the CLI's path for a .pt2: no re-export)."""
        return self._swap(program, in_place=True)

    def _swap(self, target, in_place: bool) -> list[str]:
        if not self.adapter:
            raise UserError("lora-swap needs adapter=DIR (a PEFT adapter folder with the new weights)")
        return hotswap(target, self.adapter_name, self.adapter, in_place=in_place)
