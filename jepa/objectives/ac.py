"""The V-JEPA 2-AC objective: an action-conditioned predictor learns how a frozen encoder's frame
representations evolve.

Each frame is encoded on its own by the frozen encoder (the frame repeated to fill one tubelet), outputs
layer-normalised (no affine): z_t [N, D]. With actions a_t (applied after frame t) and states s_t:
  - teacher forcing: from z_0..z_{T-2}, a_0..a_{T-2} predict z_1..z_{T-1} in one block-causal pass;
  - rollout: from z_0 alone, predict z_1..z_R autoregressively, each prediction fed back (layer-normalised);
loss = mean |prediction - target|^p / p of both (plus an L1 next-state loss when states are used).
States are either unused ("none": the state token carries zeros, only its bias and position) or the padded
physical state ("physics"); rollouts then feed back the predictor's own next-state estimate, as planning must.

The frozen encoder's parameters live in the train state's "ema" slot (the target encoder of pretraining), so the
trainer, checkpoints and sharding treat both objectives alike; they never change here.
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
from jepa.objectives.vjepa import gated_representation_stats, layer_norm, normalize_video

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
    loss_exponent: float = 1.0
    diagnostics_every: int = 1  # collapse diagnostics only on the steps the trainer logs

    has_ema = False  # the target (frozen) encoder never changes
    needs_masks = False

    @classmethod
    def from_config(cls, config) -> ActionConditioned:
        wm = config.world_model  # values checked by jepa.config.validate
        enc = nnx.eval_shape(lambda: models.build_encoder(config.model, nnx.Rngs(0)))
        pred = nnx.eval_shape(lambda: cls._build_predictor(config, nnx.Rngs(0)))
        return cls(encoder_def=nnx.graphdef(enc), predictor_def=nnx.graphdef(pred),
                   tubelet_size=int(config.model.encoder.tubelet_size), rollout_steps=int(wm.rollout_steps),
                   state_source=str(wm.state_source), loss_exponent=float(config.loss.exponent),
                   diagnostics_every=int(config.train.log_every))

    @staticmethod
    def _build_predictor(config, rngs):
        patch = int(config.model.encoder.patch_size)
        res = int(config.data.resolution)
        return models.build_ac_predictor(config.model, (res // patch, res // patch), A_MAX, S_MAX, rngs)

    # ---- parameters: (trainable, frozen encoder) ----
    def init(self, rng: jax.Array, config) -> tuple[dict[str, Params], Params]:
        k_enc, k_pred = jax.random.split(rng)
        enc = models.build_encoder(config.model, nnx.Rngs(k_enc))
        pred = self._build_predictor(config, nnx.Rngs(k_pred))
        return ({"predictor": nnx.to_pure_dict(nnx.state(pred, nnx.Param))},
                nnx.to_pure_dict(nnx.state(enc, nnx.Param)))

    def update_target(self, target: Params, params: dict[str, Params], momentum) -> Params:
        del params, momentum
        return target  # frozen

    @staticmethod
    def data_keys() -> list[str]:
        return ["video", "actions", "states"]

    # ---- forward passes ----
    def encode_frames(self, encoder_params: Params, video: jax.Array) -> jax.Array:
        """uint8 [B, T, H, W, 3] -> layer-normalised frame representations float32 [B, T, N, D] (no gradient)."""
        b, t = video.shape[:2]
        frames = normalize_video(video).reshape(b * t, 1, *video.shape[2:])
        frames = jnp.repeat(frames, self.tubelet_size, axis=1)                  # each frame fills one tubelet
        encoder = nnx.merge(self.encoder_def, nnx.State(encoder_params))
        z = layer_norm(encoder(frames))
        return jax.lax.stop_gradient(z.reshape(b, t, *z.shape[1:]))

    def states_of(self, states: jax.Array) -> jax.Array:
        return states if self.state_source == "physics" else jnp.zeros_like(states)

    def predict(self, predictor_params: Params, z: jax.Array, actions: jax.Array, states: jax.Array):
        """One block-causal pass: (layer-normalised next-frame predictions [B, T, N, D], next states [B, T, S])."""
        predictor = nnx.merge(self.predictor_def, nnx.State(predictor_params))
        z_next, s_next = predictor(z, actions, self.states_of(states))
        return layer_norm(z_next), s_next

    def rollout(self, predictor_params: Params, z: jax.Array, actions: jax.Array, states: jax.Array) -> jax.Array:
        """Imagine len(actions) - k frames autoregressively after k observed ones.

        z [B, k, N, D] observed representations, states [B, k, S] observed states, actions [B, k + H - 1, A]
        -> predicted representations of frames k .. k + H - 1: [B, H, N, D]. Every call has static shapes
        (H passes of 1, 2, ... growing sequences), so it jits and vmaps over CEM samples."""
        k = z.shape[1]
        horizon = actions.shape[1] - k + 1
        if horizon < 1:
            raise ValueError(f"rollout: {actions.shape[1]} actions for {k} observed frames, need at least {k}")
        for i in range(horizon):  # predict() feeds states only when state_source is "physics"
            z_next, s_next = self.predict(predictor_params, z, actions[:, :k + i], states)
            z = jnp.concatenate([z, z_next[:, -1:]], axis=1)
            states = jnp.concatenate([states, s_next[:, -1:]], axis=1)
        return z[:, k:]

    # ---- the loss ----
    def loss(self, params: dict[str, Params], encoder_params: Params, batch: dict[str, jax.Array], step=0):
        z = self.encode_frames(encoder_params, batch["video"])
        actions, states = batch["actions"], batch["states"]
        p = self.loss_exponent
        dist = lambda a, b: jnp.mean(jnp.abs(a - b) ** p) / p
        z_tf, s_tf = self.predict(params["predictor"], z[:, :-1], actions[:, :-1], states[:, :-1])
        r = self.rollout_steps
        z_roll = self.rollout(params["predictor"], z[:, :1], actions[:, :r], states[:, :1])
        aux = {"loss/teacher_forcing": dist(z_tf, z[:, 1:]), "loss/rollout": dist(z_roll, z[:, 1:r + 1])}
        total = aux["loss/teacher_forcing"] + aux["loss/rollout"]
        if self.state_source == "physics":
            aux["loss/state"] = jnp.mean(jnp.abs(s_tf - states[:, 1:]))
            total = total + aux["loss/state"]
        # repr/*: the frozen encoder's frame features (the trainer's collapse monitor watches these); pred/std:
        # the predictions' per-dimension spread, far below repr/std when the predictor outputs an average frame.
        aux.update(gated_representation_stats(z.reshape(-1, *z.shape[2:]), step, self.diagnostics_every))
        aux["pred/std"] = jnp.mean(jnp.std(z_tf.reshape(-1, z_tf.shape[-1]), axis=0))
        return total, aux

    # ---- cost ----
    @staticmethod
    def step_flops(config) -> float:
        """Analytic FLOPs of one train step over the global batch: frozen encoder forward on every frame, predictor
        forward + backward (3x forward) on the teacher-forcing pass and every rollout pass."""
        dims = models.resolved_dims(config.model)
        e = dims["encoder"]
        p = config.model.ac_predictor
        pw, pd = int(p.width), int(p.depth)
        pm = int(p.mlp_dim) or 4 * pw
        n = (int(config.data.resolution) // e["patch_size"]) ** 2
        t, r = int(config.data.num_frames), int(config.world_model.rollout_steps)
        encoder = t * (metrics_lib.patch_embed_flops(n, e["width"], e["patch_size"], e["tubelet_size"])
                       + metrics_lib.vit_forward_flops(n, e["width"], e["depth"], e["mlp_dim"]))

        def predictor_pass(steps: int) -> float:
            tokens = steps * (n + 2)
            io = (2 * metrics_lib.linear_flops(steps * n, e["width"], pw)     # patch embedding and projection
                  + metrics_lib.linear_flops(steps, A_MAX + S_MAX, pw))    # action and state embeddings
            return 3 * (io + metrics_lib.vit_forward_flops(tokens, pw, pd, pm))

        predictor = predictor_pass(t - 1) + sum(predictor_pass(k) for k in range(1, r + 1))
        return (encoder + predictor) * int(config.train.global_batch_size)
