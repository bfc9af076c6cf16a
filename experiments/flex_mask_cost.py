"""What the ``flex`` backend's block mask costs: built from key ranges against FlexAttention's ``create_block_mask``.

For the paper's w=4 pattern on the benchmark shapes (one query of 10 tokens; one document of 512 / 4,096 tokens, or
100 documents of 164), prints the milliseconds of ``flex_block_mask`` (ranges -> block counts -> ``BlockMask``) and of
``create_block_mask`` evaluating the same ``mask_mod`` over the padded tokens² grid, the block sparsity, and whether
both give the same blocks. Median of 5 (3 for create_block_mask).

Usage: python experiments/flex_mask_cost.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_sparse_ce import PRESETS, DIRECTION_FLAGS  # noqa: E402
from modeling_sparse_ce.attention_flex import flex_block_mask  # noqa: E402
from modeling_sparse_ce.pattern import AttentionPattern  # noqa: E402
from modeling_sparse_ce.segments import build_segment_layout  # noqa: E402
from sparse_ce.bench.measure import SEP, Setting, make_inputs  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.nn.attention.flex_attention import create_block_mask

    pattern = AttentionPattern.from_flags({f: PRESETS["sparse"][f] for f in DIRECTION_FLAGS}, 4)
    print("| setting | packed tokens | ranges -> BlockMask ms | create_block_mask ms | block sparsity | same blocks |")
    print("|---|---|---|---|---|---|")
    for setting in (Setting(1, 512), Setting(1, 4096), Setting(100, 164)):
        batch = make_inputs(setting, torch.device("cpu"))
        layout = build_segment_layout(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], SEP)
        ours = flex_block_mask(layout, pattern, torch.device("cpu"))
        padded = ours.seq_lengths[0]
        ms_ours = median_ms(lambda: flex_block_mask(layout, pattern, torch.device("cpu")), 5)
        block = ours.BLOCK_SIZE[0]  # the CPU block size (16)
        ms_theirs = median_ms(lambda: create_block_mask(ours.mask_mod, None, None, padded, padded, device="cpu",
                                                        BLOCK_SIZE=block), 3)
        theirs = create_block_mask(ours.mask_mod, None, None, padded, padded, device="cpu", BLOCK_SIZE=block)
        same = torch.equal(ours.to_dense(), theirs.to_dense()) and torch.equal(ours.full_kv_num_blocks,
                                                                                theirs.full_kv_num_blocks)
        print(f"| {setting.label} | {layout.positions.shape[0]} | {ms_ours:.1f} | {ms_theirs:.1f} | "
              f"{ours.sparsity():.1f}% | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
