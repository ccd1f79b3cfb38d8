"""arcface_torch recipes shipped with facedistill (a package only so that installed copies can find them)."""
