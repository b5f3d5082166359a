"""The V-JEPA 2-AC objective: an action-conditioned predictor learns how a frozen encoder's frame
representations evolve (or, with world_model.train_encoder, an encoder trained jointly with it).

Each frame is encoded on its own by the encoder (the frame repeated to fill one tubelet), outputs
layer-normalised (no affine): z_t [N, D]. With actions a_t (applied after frame t) and states s_t:
  - teacher forcing: from z_0..z_{T-2}, a_0..a_{T-2} predict z_1..z_{T-1} in one block-causal pass;
  - rollout: from the first C observed frames z_0..z_{C-1} (world_model.context_frames; two or more show
    velocities), predict z_C..z_{C+R-1} autoregressively, each prediction fed back (layer-normalised), as the
    planner does;
loss = mean |prediction - target|^p / p of both (plus an L1 next-state loss when states are used).
With world_model.action_block = k, frames are k environment steps apart and a_t holds the k actions between
frame t and t + 1, each zero-padded to A_MAX and concatenated in order ([k * A_MAX]).
States are either unused ("none": the state token carries zeros, only its bias and position) or the padded
physical state ("physics"); rollouts then feed back the predictor's own next-state estimate, as planning must.

The encoder the world model uses lives in the train state's "ema" slot (the target encoder of pretraining), so the
trainer, checkpoints, sharding and every reader of a run (planning, surprise, export) treat both objectives alike.
Frozen (the default), it never changes. With world_model.train_encoder (PLDM-style joint training) the trained
copy is params["encoder"], started from the same weights; the predictions and the targets both come from it, with
gradients through both (no stop-gradient, no EMA target), and the VICReg-style variance/covariance terms
(loss.variance_weight, covariance_weight) on its per-frame representations keep the trivially predictable
constant representation away. update_target copies it into "ema" after every update, so readers of "ema" get
the trained encoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jepa import metrics as metrics_lib
from jepa import models
from jepa.envs import A_MAX, S_MAX
from jepa.objectives.vjepa import gated_representation_stats, layer_norm, normalize_video, variance_covariance

Params = Any

# config.world_model.state_source: "none" = vision only, "physics" = the padded (qpos, qvel) state is an input.
STATE_SOURCES = ("none", "physics")
# config.encoder_weights: the pretraining run's EMA encoder (config.encoder_from), or the same architecture
# untrained (the planning baseline).
ENCODER_WEIGHTS = ("pretrained", "random")


@dataclasses.dataclass(frozen=True)
class ActionConditioned:
    encoder_def: Any
    predictor_def: Any
    tubelet_size: int
    rollout_steps: int
    state_source: str = "none"
    context_frames: int = 1
    action_block: int = 1
    action_to_patches: bool = False
    inverse_weight: float = 0.0  # > 0: the inverse-dynamics head and its loss (params["inverse"])
    train_encoder: bool = False  # the encoder trains with the predictor (params["encoder"], copied into "ema")
    variance_weight: float = 0.0  # with train_encoder: VICReg-style terms on the encoder's frame representations
    covariance_weight: float = 0.0
    loss_exponent: float = 1.0
    diagnostics_every: int = 1  # collapse diagnostics only on the steps the trainer logs

    has_ema = False  # the target encoder is frozen, or a copy of the trained one: never an EMA
    needs_masks = False

    @classmethod
    def from_config(cls, config) -> ActionConditioned:
        wm = config.world_model  # values checked by jepa.config.validate
        enc = nnx.eval_shape(lambda: models.build_encoder(config.model, nnx.Rngs(0)))
        pred = nnx.eval_shape(lambda: cls._build_predictor(config, nnx.Rngs(0)))
        return cls(encoder_def=nnx.graphdef(enc), predictor_def=nnx.graphdef(pred),
                   tubelet_size=int(config.model.encoder.tubelet_size), rollout_steps=int(wm.rollout_steps),
                   state_source=str(wm.state_source), context_frames=int(wm.context_frames),
                   action_block=int(wm.action_block), action_to_patches=bool(wm.action_to_patches),
                   inverse_weight=float(wm.inverse_dynamics_weight), train_encoder=bool(wm.train_encoder),
                   variance_weight=float(config.loss.variance_weight),
                   covariance_weight=float(config.loss.covariance_weight), loss_exponent=float(config.loss.exponent),
                   diagnostics_every=int(config.train.log_every))

    @staticmethod
    def _build_predictor(config, rngs):
        patch = int(config.model.encoder.patch_size)
        res = int(config.data.resolution)
        block = int(config.world_model.action_block)
        return models.build_ac_predictor(config.model, (res // patch, res // patch), block * A_MAX, S_MAX, rngs)

    # ---- parameters: (trainable, the encoder the world model uses) ----
    def init(self, rng: jax.Array, config) -> tuple[dict[str, Params], Params]:
        k_enc, k_pred = jax.random.split(rng)
        enc = models.build_encoder(config.model, nnx.Rngs(k_enc))
        pred = self._build_predictor(config, nnx.Rngs(k_pred))
        params = {"predictor": nnx.to_pure_dict(nnx.state(pred, nnx.Param))}
        if self.inverse_weight > 0:
            width = int(config.model.ac_predictor.width)
            params["inverse"] = self._init_inverse(jax.random.fold_in(rng, 0x1D), params["predictor"], width)
        encoder = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
        if self.train_encoder:  # the trainer puts encoder_from's weights into both (jepa.train.load_frozen_encoder)
            params["encoder"] = encoder
        return params, encoder

    @staticmethod
    def _init_inverse(key, predictor_params: Params, width: int) -> Params:
        """Inverse-dynamics head: an MLP from (mean-pooled z_t, mean-pooled predicted z_t+1) to the action token."""
        enc_w = predictor_params["proj_kernel"].shape[1]
        action_w = predictor_params["action_kernel"].shape[0]
        k1, k2 = jax.random.split(key)
        return {"kernel1": 0.02 * jax.random.truncated_normal(k1, -2, 2, (2 * enc_w, width), jnp.float32),
                "bias1": jnp.zeros((width,), jnp.float32),
                "kernel2": 0.02 * jax.random.truncated_normal(k2, -2, 2, (width, action_w), jnp.float32),
                "bias2": jnp.zeros((action_w,), jnp.float32)}

    @staticmethod
    def inverse_dynamics(inverse_params: Params, z: jax.Array, z_next: jax.Array) -> jax.Array:
        """Action tokens [B, T, W] inferred from frame representations z, z_next [B, T, N, D] (mean over patches)."""
        x = jnp.concatenate([z.mean(2), z_next.mean(2)], axis=-1)
        h = jax.nn.gelu(x @ inverse_params["kernel1"] + inverse_params["bias1"])
        return h @ inverse_params["kernel2"] + inverse_params["bias2"]

    def update_target(self, target: Params, params: dict[str, Params], momentum) -> Params:
        del momentum
        return params["encoder"] if self.train_encoder else target  # the trained encoder's copy, or frozen

    @staticmethod
    def data_keys() -> list[str]:
        return ["video", "actions", "states"]

    # ---- forward passes ----
    def encode_frames(self, encoder_params: Params, video: jax.Array) -> jax.Array:
        """uint8 [B, T, H, W, 3] -> layer-normalised frame representations float32 [B, T, N, D] (no gradient into
        the encoder unless it trains)."""
        b, t = video.shape[:2]
        frames = normalize_video(video).reshape(b * t, 1, *video.shape[2:])
        frames = jnp.repeat(frames, self.tubelet_size, axis=1)                  # each frame fills one tubelet
        encoder = nnx.merge(self.encoder_def, nnx.State(encoder_params))
        z = layer_norm(encoder(frames))
        z = z.reshape(b, t, *z.shape[1:])
        return z if self.train_encoder else jax.lax.stop_gradient(z)

    def states_of(self, states: jax.Array) -> jax.Array:
        return states if self.state_source == "physics" else jnp.zeros_like(states)

    def predict(self, predictor_params: Params, z: jax.Array, actions: jax.Array, states: jax.Array):
        """One block-causal pass: (layer-normalised next-frame predictions [B, T, N, D], next states [B, T, S])."""
        predictor = nnx.merge(self.predictor_def, nnx.State(predictor_params))
        z_next, s_next = predictor(z, actions, self.states_of(states), action_to_patches=self.action_to_patches)
        return layer_norm(z_next), s_next

    def observe(self, predictor_params: Params, z: jax.Array, actions: jax.Array, states: jax.Array) -> tuple:
        """The predictor's key/value cache of observed steps (z [B, m, N, D], the actions after them [B, m, A],
        states [B, m, S]), for rollout(context=...): a planner encodes its shared past once, not once per sample."""
        predictor = nnx.merge(self.predictor_def, nnx.State(predictor_params))
        return predictor.extend(z, actions, self.states_of(states), action_to_patches=self.action_to_patches)[2]

    def rollout(self, predictor_params: Params, z: jax.Array, actions: jax.Array, states: jax.Array,
                context: tuple | None = None) -> jax.Array:
        """Imagine len(actions) - k frames autoregressively after k observed ones.

        z [B, k, N, D] observed representations, states [B, k, S] observed states, actions [B, k + H - 1, A]
        -> predicted representations of frames k .. k + H - 1: [B, H, N, D]. context: optional cache of observed
        steps before z's (observe(); batch 1 serves every row). Each imagined frame is one cached step of the
        predictor (no earlier step is recomputed) and every shape is static, so it jits over CEM samples."""
        predictor = nnx.merge(self.predictor_def, nnx.State(predictor_params))
        k = z.shape[1]
        horizon = actions.shape[1] - k + 1
        if horizon < 1:
            raise ValueError(f"rollout: {actions.shape[1]} actions for {k} observed frames, need at least {k}")
        cache, steps, a = context, [], actions[:, :k]
        for i in range(horizon):  # states_of() feeds states only when state_source is "physics"
            z_next, s_next, cache = predictor.extend(z, a, self.states_of(states), cache,
                                                     action_to_patches=self.action_to_patches)
            z, states, a = layer_norm(z_next[:, -1:]), s_next[:, -1:], actions[:, k + i:k + i + 1]
            steps.append(z)
        return jnp.concatenate(steps, axis=1)

    # ---- the loss ----
    def loss(self, params: dict[str, Params], encoder_params: Params, batch: dict[str, jax.Array], step=0):
        # A trained encoder is read from params (encoder_params holds the same values, copied after the last
        # update, but gradients reach only params); its outputs are both the predictor's inputs and its targets.
        z = self.encode_frames(params["encoder"] if self.train_encoder else encoder_params, batch["video"])
        actions, states = batch["actions"], batch["states"]
        p = self.loss_exponent
        dist = lambda a, b: jnp.mean(jnp.abs(a - b) ** p) / p
        z_tf, s_tf = self.predict(params["predictor"], z[:, :-1], actions[:, :-1], states[:, :-1])
        r, c = self.rollout_steps, self.context_frames
        z_roll = self.rollout(params["predictor"], z[:, :c], actions[:, :c + r - 1], states[:, :c])
        aux = {"loss/teacher_forcing": dist(z_tf, z[:, 1:]), "loss/rollout": dist(z_roll, z[:, c:c + r])}
        total = aux["loss/teacher_forcing"] + aux["loss/rollout"]
        if self.state_source == "physics":
            aux["loss/state"] = jnp.mean(jnp.abs(s_tf - states[:, 1:]))
            total = total + aux["loss/state"]
        if self.inverse_weight > 0:
            # On the *predicted* next frame: with a frozen encoder this is what makes the predictor keep the
            # action's effect in its predictions (on encoder features alone it would train only the head).
            inferred = self.inverse_dynamics(params["inverse"], z[:, :-1], z_tf)
            aux["loss/inverse_dynamics"] = jnp.mean(jnp.abs(inferred - actions[:, :-1]))
            total = total + self.inverse_weight * aux["loss/inverse_dynamics"]
        if self.train_encoder:
            # On the layer-normalised z, the space the loss measures distances in, not on the encoder's raw
            # outputs: raw features could meet the variance hinge through a per-token scale or offset that the
            # layer norm removes, leaving every target the same (a collapse the loss would reward). Pooled over
            # clips, frames and patches, as in pretraining (variance_covariance normalises again: a no-op here).
            var, cov = variance_covariance(z.reshape(-1, *z.shape[2:]))
            aux["reg/variance"], aux["reg/covariance"] = var, cov
            total = total + self.variance_weight * var + self.covariance_weight * cov
        # repr/*: the encoder's frame features (the trainer's collapse monitor watches these); pred/std:
        # the predictions' per-dimension spread, far below repr/std when the predictor outputs an average frame.
        aux.update(gated_representation_stats(z.reshape(-1, *z.shape[2:]), step, self.diagnostics_every))
        aux["pred/std"] = jnp.mean(jnp.std(z_tf.reshape(-1, z_tf.shape[-1]), axis=0))
        aux["diag/action_shuffle_ratio"] = self._gated_shuffle_ratio(params["predictor"], z, actions, states,
                                                                     aux["loss/teacher_forcing"], step)
        return total, aux

    def shuffle_ratio(self, predictor_params: Params, z: jax.Array, actions: jax.Array, states: jax.Array,
                      true_loss: jax.Array | None = None) -> jax.Array:
        """Teacher-forced loss with the actions shuffled across the batch (rolled by one clip) over the loss with
        the true actions: 1 for a predictor that ignores its actions, above 1 when actions inform the
        predictions. z [B, T, N, D] observed representations, actions [B, T, W], states [B, T, S]."""
        p = self.loss_exponent
        dist = lambda a, b: jnp.mean(jnp.abs(a - b) ** p) / p
        if true_loss is None:
            true_loss = dist(self.predict(predictor_params, z[:, :-1], actions[:, :-1], states[:, :-1])[0], z[:, 1:])
        shuffled = jnp.roll(actions, 1, axis=0)
        z_sh, _ = self.predict(predictor_params, z[:, :-1], shuffled[:, :-1], states[:, :-1])
        return jax.lax.stop_gradient(dist(z_sh, z[:, 1:]) / jnp.maximum(true_loss, 1e-12))

    def _gated_shuffle_ratio(self, predictor_params, z, actions, states, true_loss, step) -> jax.Array:
        """shuffle_ratio on the steps the trainer logs only (it costs a teacher-forced pass), zero otherwise."""
        ratio = lambda: self.shuffle_ratio(predictor_params, z, actions, states, true_loss)
        if self.diagnostics_every <= 1:
            return ratio()
        return jax.lax.cond((jnp.asarray(step) + 1) % self.diagnostics_every == 0, ratio,
                            lambda: jnp.zeros((), jnp.float32))

    # ---- cost ----
    @staticmethod
    def step_flops(config) -> float:
        """Analytic FLOPs of one train step over the global batch: encoder forward on every frame (plus its backward
        when world_model.train_encoder: 2x forward for the blocks, 1x for the patch embedding, whose input gradient
        is not needed), predictor forward + backward (3x forward) on the teacher-forcing pass and every rollout
        pass."""
        dims = models.resolved_dims(config.model)
        e = dims["encoder"]
        p = config.model.ac_predictor
        pw, pd = int(p.width), int(p.depth)
        pm = int(p.mlp_dim) or 4 * pw
        n = (int(config.data.resolution) // e["patch_size"]) ** 2
        t, r = int(config.data.num_frames), int(config.world_model.rollout_steps)
        c, a = int(config.world_model.context_frames), int(config.world_model.action_block) * A_MAX
        passes = (2, 3) if config.world_model.train_encoder else (1, 1)  # (patch embedding, blocks)
        encoder = t * (passes[0] * metrics_lib.patch_embed_flops(n, e["width"], e["patch_size"], e["tubelet_size"])
                       + passes[1] * metrics_lib.vit_forward_flops(n, e["width"], e["depth"], e["mlp_dim"]))

        def predictor_pass(steps: int, cached: int = 0) -> float:
            """`steps` new steps attending to themselves and to `cached` earlier ones (rollout's key/value cache)."""
            tokens = steps * (n + 2)
            io = (2 * metrics_lib.linear_flops(steps * n, e["width"], pw)     # patch embedding and projection
                  + metrics_lib.linear_flops(steps, a + S_MAX, pw))        # action and state embeddings
            cache_attention = pd * 2 * 2 * tokens * cached * (n + 2) * pw    # scores and values over cached keys
            return 3 * (io + metrics_lib.vit_forward_flops(tokens, pw, pd, pm) + cache_attention)

        # Teacher forcing: one pass over t - 1 steps; rollout: the c observed steps, then one cached step per frame.
        predictor = predictor_pass(t - 1) + predictor_pass(c) + sum(predictor_pass(1, c + i) for i in range(r - 1))
        return (encoder + predictor) * int(config.train.global_batch_size)
