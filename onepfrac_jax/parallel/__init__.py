"""Devices and processes: the one data mesh, and multi-process start-up."""
