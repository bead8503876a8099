# Frozen modules of the unix firmware: asyncio, for applications that drive
# the client from a task.
include("$(MPY_DIR)/extmod/asyncio")
