"""Behaviour: making locks and judging what they do. Nothing below :mod:`weightlock.api` imports it.

- :mod:`.forge`, :mod:`.selection`, :mod:`.pairs`: a lock from a base model and safety pairs;
- :mod:`.evaluate`: ``eval`` and ``tune`` (bakes each alpha through :func:`weightlock.api.apply_lock`);
- :mod:`.judge`, :mod:`.prompt_sets`, :mod:`.plot`: verdicts, prompt sets, curves and heatmaps.
"""
