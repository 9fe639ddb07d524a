"""Calibration: capture of site input statistics and block-by-block processing."""

from jquant.calib.capture import InputStatistics as InputStatistics
from jquant.calib.capture import capture_statistics as capture_statistics
from jquant.calib.capture import model_input_statistics as model_input_statistics
from jquant.calib.capture import set_capture as set_capture
from jquant.calib.sequential import run_sequential as run_sequential

__all__ = ["InputStatistics", "capture_statistics", "model_input_statistics", "run_sequential", "set_capture"]
