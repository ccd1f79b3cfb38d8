"""Patches to upstream arcface_torch (a package only so that installed copies can find them)."""
