"""Healing (``lowrank_layers.heal``): distillation of a converted model towards the original."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_layers import DynamicLowRankLinear, LowRankLinear, convert_model
from lowrank_layers.adaptive import AdaptiveLowRankLinear
from lowrank_layers.heal import HealReport, distillation_loss, heal, trainable_parameters

from .helpers import tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: threads only add overhead, and on a shared 2-core machine
    OpenMP's spinning threads made a 0.3 s healing take 30 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(out_features: int = 16) -> nn.Sequential:
    """A small MLP with a norm and a dropout, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64),
        nn.LayerNorm(64),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(64, out_features),
    )


def mlp_pair() -> tuple[nn.Sequential, nn.Sequential]:
    """(student, teacher): the MLP and its rank-4 conversion, the guard off (both layers are
    too small to gain and the second is the output layer: healing needs them converted)."""
    teacher = mlp()
    student = copy.deepcopy(teacher)
    convert_model(student, rank=4, guard=False)
    return student, teacher


def mlp_batches(gen: torch.Generator, n: int) -> list[torch.Tensor]:
    return [torch.randn(32, 16, generator=gen) for _ in range(n)]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(24)
        self.up = nn.Linear(24, 48, bias=False)
        self.down = nn.Linear(48, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    """A residual stack of blocks and a head; ``by_keyword`` passes the blocks their input
    by keyword, which block-by-block processing cannot capture."""

    def __init__(self, by_keyword: bool = False) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(24, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x=x) if self.by_keyword else block(x)
        return self.head(x)


def stack_pair(by_keyword: bool = False, exclude: str | None = "head") -> tuple[Stack, Stack]:
    """(student, teacher): the stack and its rank-4 conversion, by default the head left
    dense; the guard off (the blocks' layers are too small to gain)."""
    torch.manual_seed(0)
    teacher = Stack(by_keyword)
    student = copy.deepcopy(teacher)
    convert_model(student, rank=4, exclude=exclude, guard=False)
    return student, teacher


def stack_batches(gen: torch.Generator, n: int) -> list[torch.Tensor]:
    return [torch.randn(4, 8, 24, generator=gen) for _ in range(n)]


def llama(**convert_kwargs) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): a tiny LlamaForCausalLM and its rank_ratio=0.25 conversion, the
    guard off (its layers are too small to gain and lm_head is the output layer)."""
    teacher = tiny_llama(heads=2, kv_heads=2, vocab=64).train()
    student = copy.deepcopy(teacher)
    convert_model(student, rank_ratio=0.25, guard=False, **convert_kwargs)
    return student, teacher


def token_batches(gen: torch.Generator, n: int) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "input_ids": torch.randint(0, 64, (4, 16), generator=gen),
            "attention_mask": torch.ones(4, 16, dtype=torch.long),
        }
        for _ in range(n)
    ]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """The state_dict keys whose values are not bit-identical to ``before``."""
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------
# the objective


def test_kl_is_the_divergence_of_the_softmaxes(gen):
    s, t = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    p, q = t.softmax(-1), s.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(s, t, "kl"), expected)  # float32 defaults
    assert distillation_loss(t, t, "kl").abs() < 1e-6  # zero up to float32 rounding


def test_cosine_and_mse_per_token(gen):
    s, t = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 4, 8, generator=gen)
    expected = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    torch.testing.assert_close(distillation_loss(s, t, "cosine"), expected)
    torch.testing.assert_close(distillation_loss(2 * t, t, "cosine"), torch.tensor(0.0))
    # normalised by the teacher's mean squared norm: predicting zeros scores exactly 1
    assert distillation_loss(torch.zeros_like(t), t, "mse").item() == pytest.approx(1.0)
    expected = (s - t).square().sum(-1).mean() / t.square().sum(-1).mean()
    torch.testing.assert_close(distillation_loss(s, t, "mse"), expected)


@pytest.mark.parametrize("objective", ["kl", "cosine", "mse"])
def test_padding_is_left_out_of_the_loss(gen, objective):
    s, t = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[1, 5:] = 0
    loss = distillation_loss(s, t, objective, mask)
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] = 100.0  # anything at the padding
    t2[mask == 0] = -3.0
    assert torch.equal(distillation_loss(s2, t2, objective, mask), loss)
    kept = mask.bool()
    expected = distillation_loss(s[kept], t[kept], objective)  # the kept tokens alone
    torch.testing.assert_close(loss, expected)
    assert not torch.equal(distillation_loss(s2, t2, objective), loss)  # no mask: it counts


def test_loss_is_float32_for_half_inputs(gen):
    s = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
    t = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
    loss = distillation_loss(s, t, "kl")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distillation_loss(s.float(), t.float(), "kl"))


def test_distillation_loss_errors(gen):
    s = torch.randn(2, 3, generator=gen)
    with pytest.raises(ValueError, match=r"^objective must be one of kl, cosine, mse, got 'l1'$"):
        distillation_loss(s, s, "l1")
    with pytest.raises(ValueError, match=r"student's output has shape \(2, 3\) and the teacher's"):
        distillation_loss(s, s[:, :2], "mse")


# --------------------------------------------------------------------------------------
# what is trained


def test_trainable_parameters_by_group():
    student, _ = mlp_pair()
    assert list(trainable_parameters(student, ("factors",))) == [
        "0.U", "0.S", "0.Vh", "4.U", "4.S", "4.Vh",
    ]  # fmt: skip
    assert list(trainable_parameters(student, ("biases",))) == ["0.bias", "4.bias"]
    assert list(trainable_parameters(student, ("norms",))) == ["1.weight", "1.bias"]
    assert list(trainable_parameters(student, "norms")) == ["1.weight", "1.bias"]


def test_every_layer_family_has_its_factors_selected():
    torch.manual_seed(0)
    dense = nn.Linear(16, 16)
    adaptive = AdaptiveLowRankLinear.from_linear(dense)
    model = nn.Sequential(
        LowRankLinear.from_linear(dense, rank=4, balance="rownorm"),
        DynamicLowRankLinear.from_linear(dense, rank=4),
        adaptive,
    )
    names = list(trainable_parameters(model, ("factors",)))
    assert names == ["0.U", "0.S", "0.Vh", "0.D", "1.U", "1.S", "1.Vh"]  # 2 is still dense
    adaptive.switch_to_lowrank(rank=4)
    names = list(trainable_parameters(model, ("factors", "biases")))
    assert names[-4:] == ["2.U", "2.S", "2.Vh", "2.bias"]


# --------------------------------------------------------------------------------------
# end to end


def test_end_to_end_heals_an_mlp(gen):
    student, teacher = mlp_pair()
    train, held_out = mlp_batches(gen, 8), mlp_batches(gen, 2)
    report = heal(student, teacher, train, steps=60, lr=1e-2, eval_batches=held_out)
    assert isinstance(report, HealReport)
    assert (report.mode, report.objective, report.steps) == ("end_to_end", "cosine", 60)
    assert len(report.losses) == 60 and report.seconds > 0
    # factors: (64 + 1 + 16)·4 and (16 + 1 + 64)·4
    assert report.trainable_parameters == 81 * 4 * 2
    assert report.teacher_bytes == 4 * sum(p.numel() for p in teacher.parameters())
    assert report.before > 0.05  # something to heal: rank 4 of 16 loses much
    assert report.after < 0.5 * report.before  # observed: about a third
    student.eval()
    teacher.eval()
    with torch.no_grad():  # the report's number is the held-out loss
        losses = [distillation_loss(student(x), teacher(x), "cosine") for x in held_out]
    assert report.after == pytest.approx(float(sum(losses)) / 2, rel=1e-6)  # float32 sums
    text = str(report)
    assert text.startswith("healed (end_to_end, cosine): 60 steps in ")
    assert "648 trainable parameters" in text and "held-out loss " in text


@pytest.mark.parametrize("objective", ["kl", "mse"])
def test_other_objectives_heal_too(gen, objective):
    student, teacher = mlp_pair()
    train, held_out = mlp_batches(gen, 8), mlp_batches(gen, 2)
    report = heal(
        student, teacher, train, objective=objective, steps=40, lr=1e-2, eval_batches=held_out
    )
    assert report.objective == objective
    assert report.after < 0.8 * report.before  # observed: well under half


def test_end_to_end_heals_a_llama(gen):
    student, teacher = llama()
    train, held_out = token_batches(gen, 8), token_batches(gen, 2)
    report = heal(student, teacher, train, steps=40, lr=1e-2, eval_batches=held_out)
    assert report.objective == "kl"  # the output has .logits
    assert report.before > 0
    assert report.after < 0.85 * report.before  # observed: -27%


def test_no_eval_batches_no_numbers(gen):
    student, teacher = mlp_pair()
    report = heal(student, teacher, mlp_batches(gen, 2), steps=3)
    assert report.before is None and report.after is None
    assert "held-out" not in str(report) and "\n" not in str(report)


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        (("factors",), {"0.U", "0.S", "0.Vh", "4.U", "4.S", "4.Vh"}),
        (("biases",), {"0.bias", "4.bias"}),
        (("factors", "norms"), {"0.U", "0.S", "0.Vh", "4.U", "4.S", "4.Vh", "1.weight", "1.bias"}),
    ],
)
def test_only_the_selected_parameters_change(gen, train, expected):
    student, teacher = mlp_pair()
    before = snapshot(student)
    heal(student, teacher, mlp_batches(gen, 4), steps=5, lr=1e-2, train=train)
    assert changed(student, before) == expected


@pytest.mark.parametrize("norms", [False, True])
def test_only_the_selected_parameters_of_a_llama_change(gen, norms):
    student, teacher = llama()
    before = snapshot(student)
    train = ("factors", "norms") if norms else ("factors",)
    heal(student, teacher, token_batches(gen, 2), steps=3, lr=1e-2, train=train)
    factors = {k for k in before if k.rsplit(".", 1)[-1] in ("U", "S", "Vh")}
    norm_weights = {k for k in before if "norm" in k}  # input/post-attention and final norms
    assert len(factors) == 15 * 3 and len(norm_weights) == 5
    assert changed(student, before) == (factors | norm_weights if norms else factors)
    # the embeddings and (without "norms") the norms are bit-identical
    assert "model.embed_tokens.weight" not in changed(student, before)


def test_the_teacher_is_unchanged_and_flags_are_restored(gen):
    student, teacher = mlp_pair()
    student[1].requires_grad_(False)  # trained while healing, frozen again afterwards
    student.train()
    teacher.train()
    teacher[3].eval()  # a submodule's own flag
    teacher[0].weight.requires_grad_(False)
    teacher_before = snapshot(teacher)
    student_modes, teacher_modes = modes(student), modes(teacher)
    student_flags, teacher_flags = flags(student), flags(teacher)
    before = snapshot(student)
    train = ("factors", "norms")
    report = heal(student, teacher, mlp_batches(gen, 4), steps=5, lr=1e-2, train=train)
    assert report.steps == 5
    assert {"1.weight", "1.bias"} <= changed(student, before)  # the frozen norm was trained
    assert changed(teacher, teacher_before) == set()
    assert modes(student) == student_modes and modes(teacher) == teacher_modes
    assert flags(student) == student_flags and flags(teacher) == teacher_flags
    assert all(p.grad is None for p in student.parameters())  # no gradient left behind
    assert all(p.grad is None for p in teacher.parameters())


def test_the_same_seed_gives_the_same_result(gen):
    student, teacher = mlp_pair()
    student.train()  # dropout would make runs differ: healing runs in eval mode
    batches = mlp_batches(gen, 5)
    runs = []
    for global_seed, seed in ((1, 0), (2, 0), (3, 7)):
        torch.manual_seed(global_seed)  # plays no part
        healed = copy.deepcopy(student)
        report = heal(healed, teacher, batches, steps=12, lr=1e-2, seed=seed)
        runs.append((report.losses, snapshot(healed)))
    assert runs[0][0] == runs[1][0]
    assert changed(student, runs[0][1])  # it did train
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])  # bit-identical
    assert runs[2][0] != runs[0][0]  # another seed, another batch order


def test_seconds_and_steps_budgets(gen):
    student, teacher = mlp_pair()
    batches = mlp_batches(gen, 2)
    report = heal(student, teacher, batches, steps=3, seconds=60.0)  # steps first
    assert report.steps == 3
    report = heal(student, teacher, batches, seconds=1e-9)  # however short: one step
    assert report.steps == len(report.losses) >= 1


def test_progress_bar(gen, monkeypatch, capsys):
    student, teacher = mlp_pair()
    batches = mlp_batches(gen, 2)
    assert heal(student, teacher, batches, steps=2, progress=True).steps == 2
    assert "healing" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    before = snapshot(student)
    with pytest.raises(ImportError, match=r"pip install 'lowrank-layers\[progress\]'"):
        heal(student, teacher, batches, steps=2, progress=True)
    assert changed(student, before) == set()


def test_a_diverging_loss_raises_and_restores(gen):
    student, teacher = mlp_pair()
    student.train()
    before_modes, before_flags = modes(student), flags(student)
    bad = torch.full((4, 16), float("nan"))
    with pytest.raises(FloatingPointError, match=r"^heal: the training loss is nan at step 1"):
        heal(student, teacher, [bad], steps=2)
    assert modes(student) == before_modes and flags(student) == before_flags


# --------------------------------------------------------------------------------------
# blockwise


def test_blockwise_heals_a_llama(gen):
    # the head stays dense: blockwise trains only the blocks, and the head's own error
    # would hide their progress in the end-to-end metric
    student, teacher = llama(exclude="lm_head")
    train, held_out = token_batches(gen, 8), token_batches(gen, 2)
    report = heal(
        student, teacher, train, mode="blockwise", steps=40, lr=1e-2, eval_batches=held_out
    )
    assert (report.mode, report.objective, report.steps) == ("blockwise", "kl", 40)
    assert len(report.losses) == 40
    assert report.after < 0.7 * report.before  # observed: -46%
    # each block's own loss falls over its 20 steps (noisy per batch: compare quarters)
    for block in (report.losses[:20], report.losses[20:]):
        assert sum(block[-5:]) < sum(block[:5])


def test_blockwise_leaves_layers_outside_the_blocks_alone(gen):
    student, teacher = llama()  # lm_head converted too
    before = snapshot(student)
    train, held_out = token_batches(gen, 4), token_batches(gen, 2)
    report = heal(
        student, teacher, train, mode="blockwise", steps=5, lr=1e-2, eval_batches=held_out
    )
    assert report.steps == 5  # 3 for the first block, 2 for the second
    diff = changed(student, before)
    assert {"model.layers.0.mlp.up_proj.U", "model.layers.1.self_attn.q_proj.Vh"} <= diff
    assert not any(k.startswith("lm_head") for k in diff)
    assert report.after < report.before
    assert changed(teacher, snapshot(teacher)) == set()


def test_blockwise_heals_a_plain_stack_of_blocks(gen):
    student, teacher = stack_pair()
    train, held_out = stack_batches(gen, 6), stack_batches(gen, 2)
    report = heal(
        student, teacher, train, mode="blockwise", steps=60, lr=1e-2, eval_batches=held_out
    )
    assert report.objective == "cosine" and report.steps == 60
    assert report.after < 0.7 * report.before


def test_blockwise_seconds_take_a_step_per_block_at_least(gen):
    student, teacher = llama(exclude="lm_head")
    report = heal(student, teacher, token_batches(gen, 2), mode="blockwise", seconds=1e-9)
    assert report.steps == len(report.losses) == 2  # one per block, however short the budget


def test_blockwise_is_deterministic(gen):
    student, teacher = llama(exclude="lm_head")
    batches = token_batches(gen, 3)
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        healed = copy.deepcopy(student)
        losses.append(heal(healed, teacher, batches, mode="blockwise", steps=4, lr=1e-2).losses)
    assert losses[0] == losses[1]


def test_blockwise_needs_blocks(gen):
    student, teacher = mlp_pair()
    before = snapshot(student)
    with pytest.raises(
        ValueError,
        match=r"^heal: mode='blockwise' found no repeated blocks in the Sequential .*so it "
        r"cannot be processed block by block; use mode='end_to_end'$",
    ):
        heal(student, teacher, mlp_batches(gen, 2), mode="blockwise", steps=2)
    assert changed(student, before) == set()


def test_blockwise_needs_something_to_train_in_the_blocks(gen):
    student, teacher = stack_pair(exclude=None)
    before = snapshot(student)
    with pytest.raises(
        ValueError,
        match=r"^heal: mode='blockwise' trains the parameters inside the blocks of 'blocks', "
        r"and none of the selected parameters is there",
    ):  # the blocks' low-rank layers have no bias; the head's is the only one
        heal(student, teacher, stack_batches(gen, 2), mode="blockwise", steps=2, train="biases")
    assert changed(student, before) == set()


def test_blockwise_needs_a_chain(gen):
    student, teacher = stack_pair(by_keyword=True)
    student.train()
    before, before_modes, before_flags = snapshot(student), modes(student), flags(student)
    with pytest.raises(
        ValueError,
        match=r"^heal: the student cannot be processed block by block: .* \(blocks.1; .*\); "
        r"use mode='end_to_end'$",
    ):
        heal(student, teacher, stack_batches(gen, 2), mode="blockwise", steps=2)
    assert changed(student, before) == set()
    assert modes(student) == before_modes and flags(student) == before_flags


# --------------------------------------------------------------------------------------
# errors, each raised before the models change


def test_nothing_to_train(gen):
    teacher = mlp()
    student = copy.deepcopy(teacher)  # not converted: no factors
    student.train()
    before, before_modes, before_flags = snapshot(student), modes(student), flags(student)
    with pytest.raises(
        ValueError, match=r"^heal: nothing to train: train=\('factors',\) selects no parameter"
    ):
        heal(student, teacher, mlp_batches(gen, 2), steps=2)
    with pytest.raises(ValueError, match=r"^heal: nothing to train: train=\(\)"):
        heal(student, teacher, mlp_batches(gen, 2), steps=2, train=())
    assert changed(student, before) == set()
    assert modes(student) == before_modes and flags(student) == before_flags


def test_unknown_train_entry(gen):
    student, teacher = mlp_pair()
    with pytest.raises(
        ValueError,
        match=r"^heal: train entries must be among 'factors', 'biases', 'norms', got 'weights'$",
    ):
        heal(student, teacher, mlp_batches(gen, 2), steps=2, train=("factors", "weights"))


def test_a_mismatching_teacher(gen):
    student, _ = mlp_pair()
    student.train()
    before, before_modes, before_flags = snapshot(student), modes(student), flags(student)
    with pytest.raises(
        ValueError,
        match=r"^heal: the teacher's output on the first batch has shape \(32, 8\), which does "
        r"not match the student's \(32, 16\)",
    ):
        heal(student, mlp(out_features=8), mlp_batches(gen, 2), steps=2)
    assert changed(student, before) == set()
    assert modes(student) == before_modes and flags(student) == before_flags


def test_shared_parameters(gen):
    student, teacher = mlp_pair()
    with pytest.raises(ValueError, match=r"^heal: student and teacher are the same module"):
        heal(student, student, mlp_batches(gen, 2), steps=2)
    teacher[1] = student[1]  # a shallow copy shares the norm
    with pytest.raises(
        ValueError, match=r"^heal: 2 trainable parameters \(1.weight, 1.bias\) are shared"
    ):
        heal(student, teacher, mlp_batches(gen, 2), steps=2, train=("factors", "norms"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": None}, r"^heal: give steps, seconds or both; both are None$"),
        ({"steps": 0}, r"^heal: steps must be a positive int or None, got 0$"),
        ({"steps": 2.0}, r"^heal: steps must be a positive int or None, got 2.0$"),
        ({"seconds": -1.0}, r"^heal: seconds must be a positive number or None, got -1.0$"),
        ({"objective": "l2"}, r"^heal: objective must be one of auto, kl, cosine, mse, got 'l2'$"),
        ({"mode": "layerwise"}, r"^heal: mode must be one of end_to_end, blockwise, got 'layer"),
        ({"lr": 0.0}, r"^heal: lr must be a positive number, got 0.0$"),
        ({"max_grad_norm": -1}, r"^heal: max_grad_norm must be a positive number or None, got"),
        ({"seed": 1.5}, r"^heal: seed must be an int, got 1.5$"),
        ({"eval_batches": []}, r"^heal: eval_batches is empty \(pass None to skip"),
    ],
)
def test_bad_arguments(gen, kwargs, message):
    student, teacher = mlp_pair()
    with pytest.raises(ValueError, match=message):
        heal(student, teacher, mlp_batches(gen, 2), **{"steps": 2, **kwargs})


def test_no_batches():
    student, teacher = mlp_pair()
    with pytest.raises(ValueError, match=r"^heal: batches is empty$"):
        heal(student, teacher, [], steps=2)
