// Metal prologue for the shared kernel bodies (mx.fast.metal_kernel).
#define LOCAL_X thread_position_in_threadgroup.x
#define LOCAL_Y thread_position_in_threadgroup.y
#define GRID_Y thread_position_in_grid.y
#define GRID_Z thread_position_in_grid.z
#define GROUP_SIZE_X threads_per_threadgroup.x
#define GROUP_SIZE_Y threads_per_threadgroup.y
#define SHARED threadgroup
#define BARRIER threadgroup_barrier(mem_flags::mem_threadgroup)
#define SQRT metal::sqrt
#define SHUFFLE_XOR(x, o) simd_shuffle_xor(x, (ushort)(o))
#define GRID_SIZE_Y threads_per_grid.y
