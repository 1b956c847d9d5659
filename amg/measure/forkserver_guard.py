"""Preloaded by the memory measurement's forkserver: it dies when the benchmark that started it
dies (even by SIGKILL), and its workers with it."""

from amg.measure.parent_death import die_with_parent

die_with_parent()
