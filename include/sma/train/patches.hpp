// sma/train/patches.hpp: square images as sequences of patches (sequential image classification with a shorter
// sequence). A side x side image read in raster order becomes (side/p)^2 tokens of p*p pixels: patches in raster
// order, the pixels of each patch in raster order. p = 1 leaves the image as side*side one-pixel tokens.
#pragma once

#include <sma/data/dataset.hpp>

#include <vector>

namespace sma::train {

/// Index into a patch sequence of pixel (r, c) of a side x side image: token * p * p + offset inside the patch.
inline Index patch_index(Index r, Index c, Index side, Index p) {
  const Index g = side / p;
  return ((r / p) * g + c / p) * p * p + (r % p) * p + c % p;
}

/// Every image of `d` (feature_dim 1, side * side positions) as patches of p x p pixels (feature_dim p * p).
inline data::Dataset to_patches(data::Dataset d, Index p, Index side = 28) {
  if (p < 1 || side % p != 0) throw ValueError(str_cat("to_patches: the patch size ", p, " must divide ", side));
  if (d.has_tokens() || d.feature_dim != 1)
    throw ValueError(str_cat("to_patches: expected images of one value per pixel, got feature_dim ", d.feature_dim));
  if (p == 1) return d;
  for (auto& e : d.examples) {
    if (static_cast<Index>(e.values.size()) != side * side)
      throw ValueError(str_cat("to_patches: an image has ", e.values.size(), " pixels, expected ", side * side));
    std::vector<float> v(e.values.size());
    for (Index r = 0; r < side; ++r)
      for (Index c = 0; c < side; ++c)
        v[static_cast<std::size_t>(patch_index(r, c, side, p))] = e.values[static_cast<std::size_t>(r * side + c)];
    e.values = std::move(v);
  }
  d.feature_dim = p * p;
  return d;
}

/// The raster-order pixels of one patch sequence (the inverse of to_patches for one image).
inline std::vector<float> from_patches(const std::vector<float>& v, Index p, Index side = 28) {
  std::vector<float> img(static_cast<std::size_t>(side * side));
  for (Index r = 0; r < side; ++r)
    for (Index c = 0; c < side; ++c)
      img[static_cast<std::size_t>(r * side + c)] = v.at(static_cast<std::size_t>(patch_index(r, c, side, p)));
  return img;
}

}  // namespace sma::train
