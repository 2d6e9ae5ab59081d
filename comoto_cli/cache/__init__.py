from comoto_cli.cache.h5cache import FORMAT_VERSION, CacheWriter, SliceCache, VolumeRecord

__all__ = ["FORMAT_VERSION", "CacheWriter", "SliceCache", "VolumeRecord"]
