"""Figures and reports drawn from run folders."""
