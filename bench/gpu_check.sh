#!/usr/bin/env bash
# Issue 4's GPU measurement in one command (< 8 min on an H100/H200); options: python bench/gpu_check.py -h
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
