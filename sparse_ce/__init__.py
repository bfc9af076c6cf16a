"""sparse-ce tools: conversion, re-ranking and evaluation around the sparse cross-encoder models.

The models themselves live in :mod:`modeling_sparse_ce` (the code that Hub folders carry); this package holds what
runs on a user's machine only.
"""
