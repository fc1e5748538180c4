"""Preference tuning (DPO): a causal LM learns to prefer each prompt's chosen answer to its rejected one, more than
a frozen reference model does.

    python -m torch.distributed.run --nproc_per_node N -m stages.dpo --spec spec.json

For a pair (x, y_c, y_r), with log π(y|x) the sum of the answer tokens' log-probabilities (the sft head's template
and answer masking: `Head.pairs`, `Head.answer_logps`), the log-ratios r = log π(y|x) − log π_ref(y|x) of both
answers and Δ = r_c − r_r:

    sigmoid  L = −log σ(β Δ)                                               (Rafailov et al. 2023)
    robust   L = (−(1 − ε) log σ(β Δ) + ε log σ(−β Δ)) / (1 − 2ε)           (Chowdhury et al. 2024; ε label_smoothing)
    ipo      L = (r_c / n_c − r_r / n_r − 1 / (2β))²                        (Azar et al. 2023; n: answer tokens)

as TRL's DPOTrainer computes them (tests/stages/test_dpo.py checks each against it). The loss of a micro-batch is
the mean over its pairs; every micro-batch holds as many pairs, so DeepSpeed's averaging over micro-batches and
ranks makes the step's loss the mean over the global batch. The rewards β · r of both answers are logged per step
as `loss_terms` (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies: the share of pairs whose
chosen reward is the larger, TRL's names) and reported at eval over the eval pairs, beside the sft head's metrics
of the chosen answers (eval_loss, perplexity, exact_match, accuracy).

The reference is the init model, loaded again on every start (a resume too) and frozen outside the engine, placed
as distill's teacher (stages/runtime/teacher.py: replicate, zero3, cpu); or, for a stage that trains a new adapter
(`reference_placement: adapter`), the policy's own frozen base with the adapter switched off
(`adapters.disabled`): the init model without a second copy of it. The policy runs without dropout, as TRL's
DPOTrainer does by default: at step 0 it is the reference, and every reward is 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from contract.kinds.dpo import REWARDS, DpoOptions, DpoSettings
from contract.layout import EXIT_STOPPED
from stages.runtime import adapters, curriculum, data, dist, entry, heads, lifecycle, models, teacher
from stages.runtime.dist import Dist
from stages.runtime.heads.sft import Head as SftHead
from stages.runtime.masking import EVAL_EPOCH
from stages.runtime.packing import check_block_size
from stages.runtime.spec import TrainingSpec

PREDICTIONS = "eval_predictions.jsonl"  # the last eval's generations for the prompts, in eval order (rank 0)


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, opts: DpoOptions
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(each pair's loss, the rewards β · r), from (2, pairs) tensors of summed answer log-probabilities under the
    policy and the reference and answer tokens, row 0 the chosen answers, row 1 the rejected ones. float32."""
    ratios = policy.float() - reference.float()
    beta, eps = opts.beta, opts.label_smoothing
    if opts.loss == "ipo":
        per_token = ratios / tokens.clamp(min=1)
        losses = (per_token[0] - per_token[1] - 1 / (2 * beta)) ** 2
    else:
        delta = beta * (ratios[0] - ratios[1])
        losses = (-(1 - eps) * F.logsigmoid(delta) + eps * F.logsigmoid(-delta)) / (1 - 2 * eps)
    return losses, beta * ratios.detach()


def reward_sums(rewards: torch.Tensor) -> torch.Tensor:
    """[chosen, rejected, margin, chosen > rejected] summed over the pairs of (2, pairs) rewards, float64."""
    chosen, rejected = rewards.double()
    return torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).double().sum()])


def main(spec: TrainingSpec, d: Dist) -> int:
    o = spec.options_as(DpoSettings)
    micro = spec.train.micro_batch_size
    check_block_size(spec, spec.data.max_length, key="data.max_length")  # before any data work
    tokenizer = models.load_tokenizer(spec)
    head = cast(SftHead, heads.of(spec, "sft", tokenizer, **o.sft.model_dump()))
    tokenizer.chat_template = head.template  # final/'s tokenizer writes its prompts as training did
    placement = o.dpo.reference_placement  # adapter: the launcher allows it with a new adapter only
    reference = None if placement == "adapter" else teacher.load(spec, d.device, head.auto(), placement, head.name,
                                                                 name="init")
    train, evalset = head.splits["train"], head.splits["eval"]

    def build(resume: bool) -> nn.Module:
        model = models.build_model(spec, head.auto(), tokenizer, resume=resume, **head.model_args(False))
        for module in model.modules():  # the policy's log-probabilities are the reference's until it trains
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model

    what = (f"dpo ({o.dpo.loss}, β {o.dpo.beta}, reference {o.dpo.reference_placement}), {head.describe()}")
    t = lifecycle.start(spec, d, num_samples=len(train), what=what, build=build, wrap=head.module,
                        difficulty=curriculum.difficulty(spec, train))

    def pairs(split: str, keys: list[tuple[int, int]], max_length: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(each pair's loss, rewards (2, pairs)) of the pairs `keys` under the engine's policy."""
        batch = head.pairs(split, keys, max_length)
        n = 2 * len(keys)
        if reference is None:  # the policy's module with its adapter off: the same layers, the init's weights
            with torch.no_grad(), adapters.disabled(t.engine.module):
                ref, _ = head.answer_logps(t.engine.module(**batch), batch, n)
        else:
            logits = reference.logits(**{k: v for k, v in batch.items() if k not in ("labels", "example")})
            ref, _ = head.answer_logps(head.select(logits, batch), batch, n)
        policy, tokens = head.answer_logps(t.engine(**batch), batch, n)
        return preference_loss(policy.view(2, -1), ref.view(2, -1), tokens.view(2, -1), o.dpo)

    def micro_step(keys: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, rewards = pairs("train", keys, t.sampler.max_length)
        sums = reward_sums(rewards) / len(keys)
        return losses.mean(), dict(zip(REWARDS, sums, strict=True))

    def evaluate(step: int) -> dict[str, float]:
        """The sft head's metrics of the chosen answers, and the mean rewards of the eval pairs."""
        if evalset is None:
            return {}
        t.engine.eval()
        scores = head.evaluate(t.engine, "eval", micro, d, predictions=str(Path(spec.stage_dir, PREDICTIONS)))
        total = torch.zeros(5, dtype=torch.float64)  # pairs, then reward_sums
        with torch.no_grad():
            for indices in data.eval_shards(len(evalset), micro, d.world_size, d.rank):
                _, rewards = pairs("eval", [(i, EVAL_EPOCH) for i in indices])
                real = torch.tensor([i >= 0 for i in indices], device=rewards.device)  # padding rows: -1
                total += torch.cat([real.sum().double()[None], reward_sums(rewards[:, real])]).cpu()
        dist.all_reduce_sum(total)
        return scores | {name: float(v / total[0]) for name, v in zip(REWARDS, total[1:], strict=True)}

    if t.fit(micro_step, evaluate, tokenizer, head=head):
        return EXIT_STOPPED
    return t.finish(evaluate)


if __name__ == "__main__":
    entry.run_training(main)
