"""Re-ID data: on-disk layouts (`layout`), the synthetic set (`synthetic`, torch-free), image
loading and transforms, identity-balanced sampling."""
