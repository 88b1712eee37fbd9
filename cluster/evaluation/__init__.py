"""Batch evaluation: accuracy vs sequential steps for Hogwild! and its baselines (``hogwild eval``).

``data`` (problems), ``answers`` (normalised comparison and the vote), ``methods`` (hogwild / single /
independent on a session host, answers at every budget from one run), ``hosts`` (in process or one
Ray actor per device), ``results`` (the resumable output folder), ``metrics`` (template echo and
repetition), ``report`` (Markdown table and plot), ``run`` (checks, runs what is left, reports).
"""
