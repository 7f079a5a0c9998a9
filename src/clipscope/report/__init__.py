"""Figures and the HTML report, built from stored run records only."""

from clipscope.report.html import build_report

__all__ = ["build_report"]
