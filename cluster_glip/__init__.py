__version__ = "0.1.0"

from . import pgs  # registers the strategies 'pgs' and 'pgs_released' in cluster_glip.masking.STRATEGIES
