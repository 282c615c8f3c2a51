"""Data: readers, the original preprocessing, datasets (manifest CSV, CBIS-DDSM) and the input pipeline.

Import-light on purpose: tensorflow-datasets, grain and pydicom are imported only inside the
functions that need them. The batch every source yields is defined in :mod:`gmic_jax.data.batch`.
"""
