/*
 * Minimal DLPack 1.x declarations: only what this extension reads.
 *
 * Written from the DLPack specification (dmlc/dlpack, include/dlpack/dlpack.h).
 * The layout of these structs is the ABI shared with every producer, so the
 * field order and widths must not change.
 */
#ifndef ROTALABS_STEER_DLPACK_H
#define ROTALABS_STEER_DLPACK_H

#include <stdint.h>

/* The major version this consumer understands; minor versions only add enum values. */
#define RS_DLPACK_MAJOR 1
#define RS_DLPACK_MINOR 1

/* Device types (DLDeviceType); a C enum, which is an int on every supported ABI. */
enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17,
};

/* Type codes (DLDataTypeCode). */
enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6,
};

typedef struct {
    int device_type; /* DLDeviceType */
    int32_t device_id;
} DLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} DLTensor;

/* Legacy (pre-1.0) managed tensor, capsule name "dltensor". */
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

/* Versioned managed tensor, capsule name "dltensor_versioned"; dl_tensor is last. */
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

#endif /* ROTALABS_STEER_DLPACK_H */
