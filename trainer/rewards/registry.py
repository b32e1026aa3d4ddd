"""Rewards by name: the built-ins, the ones a user registers, and ``module:function`` import paths.

A reward is a plain callable ``(completions, answers) -> (scores, metrics)``; the config names it.
Built-ins are imported on first use so a worker or a tool that needs one reward does not import all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

RewardFn = Callable[..., tuple[list[float], dict[str, float]]]

_BUILTIN = {
    "math": "trainer.rewards.math_reward:math_reward",
    "synthetic": "trainer.synthetic:synthetic_reward",
}
_REGISTERED: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
    """Register ``fn`` under ``name``; without ``fn``, returns a decorator."""
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and must not contain ':' (that marks an import path)")

    def register(reward: RewardFn) -> RewardFn:
        if not callable(reward):
            raise TypeError(f"reward {name!r} must be callable, got {type(reward).__name__}")
        if not overwrite and (name in _REGISTERED or name in _BUILTIN):
            raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTERED[name] = reward
        return reward

    return register if fn is None else register(fn)


def _import_path(path: str) -> RewardFn:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"reward import path {path!r} must look like 'package.module:function'")
    reward = getattr(importlib.import_module(module_name), attribute, None)
    if reward is None or not callable(reward):
        raise ValueError(f"reward import path {path!r} names no callable in {module_name}")
    return reward


def get_reward(name: str, *, grader: str = "math-verify", timeout_s: float | None = None) -> RewardFn:
    """The reward called ``name``: a registered one, a built-in (``math``, ``synthetic``) or ``module:function``.

    ``grader`` and ``timeout_s`` (``reward.grader``, ``reward.timeout_s``) configure the built-in
    math reward: anything but the defaults gives that process's shared ``MathReward`` for them.
    """
    if grader != "math-verify" or timeout_s is not None:
        if name != "math" or name in _REGISTERED:
            raise ValueError(
                f"grader={grader!r}, timeout_s={timeout_s!r} configure the built-in math reward; reward {name!r} "
                "takes neither (set rollout.reward=math, or leave reward.grader and reward.timeout_s at their defaults)"
            )
        from trainer.rewards.math_reward import shared_math_reward

        return shared_math_reward(grader, timeout_s)
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return _import_path(_BUILTIN[name])
    if ":" in name:
        return _import_path(name)
    raise ValueError(f"unknown reward {name!r}; expected one of {available_rewards()} or 'package.module:function'")


def available_rewards() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})
