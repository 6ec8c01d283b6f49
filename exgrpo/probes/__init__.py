"""Explanatory Inversion (Stage 1): rules, teachers, the two filters and the resumable probe set."""
from exgrpo.probes.backends import HTTPBackend, HTTPSettings, Reply, TeacherUnavailable
from exgrpo.probes.pipeline import (
    LOG_FILE,
    SET_FILE,
    FilterSettings,
    RunResult,
    difficulty_verdict,
    run_pipeline,
)
from exgrpo.probes.rules import ProbeRule, RuleSet, load_rules
from exgrpo.probes.store import read_jsonl
from exgrpo.probes.teachers import LLMTeacher, OracleTeacher, Teacher

__all__ = ["HTTPBackend", "HTTPSettings", "Reply", "TeacherUnavailable", "LOG_FILE", "SET_FILE",
           "FilterSettings", "RunResult", "difficulty_verdict", "run_pipeline", "ProbeRule", "RuleSet",
           "load_rules", "read_jsonl", "LLMTeacher", "OracleTeacher", "Teacher"]
