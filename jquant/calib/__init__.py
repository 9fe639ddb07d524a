"""Calibration: the calibration contract, capture of (grouped) site input statistics, and the block walker."""

from jquant.calib.capture import InputStatistics as InputStatistics
from jquant.calib.capture import capture_statistics as capture_statistics
from jquant.calib.capture import model_input_statistics as model_input_statistics
from jquant.calib.capture import set_capture as set_capture
from jquant.calib.data import batches as batches
from jquant.calib.data import check_calibration as check_calibration
from jquant.calib.data import check_group_ids as check_group_ids
from jquant.calib.data import num_samples as num_samples
from jquant.calib.sequential import BlockVisit as BlockVisit
from jquant.calib.sequential import Stage as Stage
from jquant.calib.sequential import walk_blocks as walk_blocks

__all__ = ["BlockVisit", "InputStatistics", "Stage", "batches", "capture_statistics", "check_calibration",
           "check_group_ids", "model_input_statistics", "num_samples", "set_capture", "walk_blocks"]
