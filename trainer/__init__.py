"""Student training from a kdcache cache: data stream, losses, AdaKD, DDK sampling, the loop, eval."""
