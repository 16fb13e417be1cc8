"""The branching engine (fork/join, instability triggers, rollouts, selection).

Builds on qckpt's public API only. Not implemented yet: see the project's issues.
"""
