"""Checkers for notebook 05's exercises."""

from ._check import check


def check_mlp_params(answer) -> None:
    """Exercise 1: parameters of one SmolLM2 MLP (576 → 1536 → 576, gate/up/down) after removing 20% of its channels."""
    kept = 1536 - int(1536 * 0.2)  # 1229 channels
    expected = 3 * 576 * kept
    check("mlp_params", answer, lambda a: int(a) == expected,
          "a channel is one row of gate_proj and up_proj and one column of down_proj; int(1536·0.2) = 307 go")


def check_gqa_heads(answer) -> None:
    """Exercise 2: q_proj + o_proj parameters of one SmolLM2 block after removing one query head per KV group."""
    heads = 9 - 3  # 3 KV groups of 3 query heads, one removed from each
    expected = 2 * 576 * heads * 64
    check("gqa_heads", answer, lambda a: int(a) == expected,
          "9 heads of 64 dims in 3 KV groups; q_proj loses 64 rows and o_proj 64 columns per removed head; k/v stay")


def check_sliced_block_params(answer) -> None:
    """Exercise 3: parameters of the linears (with the two shortcuts) of one SmolLM2 block sliced by 25%."""
    d = int(576 * 0.75)  # 432
    expected = d * (576 + 192 + 192) + 576 * d + 3 * d * 1536 + 2 * d * d
    check("sliced_block_params", answer, lambda a: int(a) == expected,
          "d' = 432; q,k,v read d' and write 576+192+192; o writes d'; gate, up, down each d'×1536; two d'×d' shortcuts")
