"""`train.grpo`: the knobs of `train.objective: grpo` (reinforcement learning with verifiable rewards).

    train:
      objective: grpo
      grpo:
        num_generations: 8          # G completions per prompt
        max_new_tokens: 256
        temperature: 1.0
        beta: 0.0                   # KL to the reference (the base, adapters off); 0 skips it
        loss_type: dapo             # grpo | bnpo | dr_grpo | dapo
        rewards:
          - {fn: numeric, field: answer}
          - {fn: mypkg.rewards:correct, weight: 0.5}

Names and semantics follow TRL 1.16's GRPOConfig (slimtune.objectives.grpo has the formulas).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_REWARDS = ("exact", "numeric", "regex", "length", "dates")


class RewardConfig(BaseModel):
    """One reward function: a built-in name or `module.path:function`, its weight and its arguments."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    fn: str = Field(min_length=1)
    """`exact` (the completion's answer equals the record's `field`, case and spaces ignored), `numeric` (its last
    number equals the field's number within `tolerance`), `regex` (1 when `pattern` is found, `fullmatch: true`:
    when it matches the whole completion), `length` (−max(0, tokens − `target`)/`target`), `dates` (a third each for
    the month name, day and year of a date written in words), or a Python callable `module.path:name` called as
    fn(prompts, completions, **record_fields) → one float per completion."""

    weight: float = 1.0
    """Its weight in the summed reward."""

    name: str | None = None
    """Its name in the logs (`rewards/<name>`); default: the function's name."""

    field: str = "answer"
    """exact / numeric / dates: the record field holding the reference answer."""

    pattern: str | None = None
    """regex: the pattern (Python `re`, DOTALL)."""

    fullmatch: bool = False
    """regex: the pattern must match the whole (stripped) completion."""

    tolerance: float = Field(1e-6, ge=0)
    """numeric: the largest accepted |answer − reference| (relative to max(1, |reference|))."""

    target: int = Field(128, gt=0)
    """length: completions up to this many tokens are not penalised."""

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.fn not in BUILTIN_REWARDS and ":" not in self.fn:
            raise ValueError(f"fn {self.fn!r}: a built-in ({', '.join(BUILTIN_REWARDS)}) or module.path:function")
        if self.fn == "regex" and not self.pattern:
            raise ValueError("fn regex needs pattern")
        return self

    @property
    def label(self) -> str:
        return self.name or self.fn.rpartition(":")[2]


class GRPOConfig(BaseModel):
    """Knobs of `train.objective: grpo` (recipe key `train.grpo`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    rewards: list[RewardConfig] = Field(default_factory=list)
    """The reward functions; the reward of a completion is their weighted sum."""

    num_generations: int = Field(8, ge=2)
    """G: completions sampled per prompt (a group); `train.micro_batch` counts prompts, so a micro-batch holds
    micro_batch × G sequences."""

    max_new_tokens: int = Field(256, gt=0)
    """The longest completion (TRL max_completion_length); also Dr. GRPO's normaliser."""

    max_prompt_len: int = Field(512, gt=0)
    """Prompts longer than this keep their last tokens."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""

    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens (0: all)."""

    beta: float = Field(0.0, ge=0)
    """KL coefficient to the reference policy (the base with the adapters off; k3 estimator per token); 0 skips
    the reference forward."""

    epsilon: float = Field(0.2, ge=0)
    """Clipping ε of the importance ratio (lower side; also the upper one unless epsilon_high is set)."""

    epsilon_high: float | None = Field(None, ge=0)
    """Upper clipping bound (DAPO's clip-higher: 0.28); default epsilon."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Aggregation of per-token losses: grpo (mean over each sequence's tokens, then over sequences), bnpo (mean
    over a micro-batch's tokens), dr_grpo (sum over tokens / (sequences × max_new_tokens)), dapo (sum over the
    step's tokens / their count). TRL's default is dapo."""

    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage = reward − group mean, divided by the std of the group (`group`), of the whole step (`batch`),
    or not divided (`none`, Dr. GRPO)."""

    importance_sampling_level: Literal["token", "sequence"] = "token"
    """`token`: a ratio per token (GRPO); `sequence`: the mean log-ratio over the sequence (GSPO)."""

    num_iterations: int = Field(1, ge=1)
    """μ: optimizer steps per generated batch; steps 2..μ reuse the rollouts with the log-probs stored at sampling
    time as the old policy (the clipped surrogate)."""

    pass_reward: float = 1.0
    """Held-out evaluation: a completion passes (pass@1) when its reward is at least this."""

    eval_max_prompts: int = Field(64, gt=0)
    """Held-out evaluation: at most this many prompts (greedy completions)."""

    sample_every: int = Field(0, ge=0)
    """Write the first group's completions of every N-th step to <run>/samples.jsonl (0: never)."""

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
