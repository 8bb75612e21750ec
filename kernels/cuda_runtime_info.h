// Queries of the extension's own (statically linked) CUDA runtime, callable from plain C++.
#pragma once
#include <string>

namespace genfast {
// Devices the runtime sees; on failure 0, with the runtime's reason in *error.
int cuda_device_count(std::string* error);
int cuda_runtime_version();
}  // namespace genfast
