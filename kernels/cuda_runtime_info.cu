#include <cuda_runtime_api.h>

#include "cuda_runtime_info.h"

namespace genfast {

int cuda_device_count(std::string* error) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for later calls
    *error = cudaGetErrorString(err);
    return 0;
  }
  return count;
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace genfast
