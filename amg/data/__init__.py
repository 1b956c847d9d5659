"""Re-ID datasets: on-disk layouts, image loading and identity-balanced sampling."""

from amg.data.layout import DatasetError as DatasetError
from amg.data.layout import ReIDDataset as ReIDDataset
from amg.data.layout import ReIDImageDataset as ReIDImageDataset
from amg.data.layout import Sample as Sample
from amg.data.layout import load_dataset as load_dataset
from amg.data.layout import read_image as read_image
from amg.data.layout import relabel_pids as relabel_pids
from amg.data.sampler import PKSampler as PKSampler
