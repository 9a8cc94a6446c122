"""absl binaries (`tfdp-train`): flags -> one library call, no logic of their own."""
