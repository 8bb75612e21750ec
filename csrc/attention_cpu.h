// Fused attention on the CPU (see ATTENTION contract in genfast/reference/attention.py).
// The problem arrives as attention::Params (kernels/attention_params.h).
#pragma once
#include <cstdint>

#include "attention_params.h"

namespace genfast {
namespace attention {

void forward_cpu(const Params& p);
void backward_cpu(const Params& p);

}  // namespace attention
}  // namespace genfast
