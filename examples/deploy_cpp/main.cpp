// hae_deploy: greedy generation from an hae_fx .pt2 package in C++, without Python.
//
//   hae_deploy model.pt2 MAX_NEW_TOKENS ID [ID ...]
//
// The package (hae_fx.export) holds two AOTInductor models, "prefill" and "decode", with eviction compiled in,
// and extra/hae_fx.txt: one fact per line (batch, prompt limits, the cache tensors, where each weight is stored).
// This program loads both models, hands them the package's weights (stored once, shared by both), allocates the
// cache both programs read and update in place, runs prefill on the prompt (repeated over the package's batch),
// then the decode program once per new token, and prints each sequence's new token ids.
//
// Loading a package runs the native code compiled into it: load trusted files only.

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using Constants = std::unordered_map<std::string, at::Tensor>;

struct CacheSpec {
  std::string name;
  c10::ScalarType dtype;
  double fill;
  std::vector<int64_t> shape;
};

struct Package {
  std::map<std::string, int64_t> sizes;  // batch, min_prompt_len, max_prompt_len, kept_len_max, ...
  std::vector<int64_t> eos_token_ids;
  std::vector<CacheSpec> cache;
  std::map<std::string, Constants> weights;  // per program, per constant
};

c10::ScalarType dtype_named(const std::string& name) {
  static const std::map<std::string, c10::ScalarType> dtypes = {
      {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"int64", at::kLong},
      {"int32", at::kInt},     {"int8", at::kChar},    {"uint8", at::kByte},        {"bool", at::kBool},
      {"float8_e4m3fn", at::kFloat8_e4m3fn}};
  auto found = dtypes.find(name);
  TORCH_CHECK(found != dtypes.end(), "unknown dtype in the package metadata: ", name);
  return found->second;
}

std::vector<int64_t> read_ints(std::istringstream& words, int64_t count) {
  std::vector<int64_t> values(count);
  for (auto& value : values) words >> value;
  return values;
}

std::vector<char> read_record(caffe2::serialize::PyTorchStreamReader& reader, const std::string& name) {
  auto [data, size] = reader.getRecord(name);
  const char* begin = static_cast<const char*>(data.get());
  return std::vector<char>(begin, begin + size);
}

// Reads extra/hae_fx.txt and the weight records it names (each record is a torch.save'd storage).
Package read_package(const std::string& path) {
  caffe2::serialize::PyTorchStreamReader reader(path);
  auto text = read_record(reader, "extra/hae_fx.txt");
  std::istringstream lines(std::string(text.begin(), text.end()));
  Package package;
  std::map<std::string, at::Tensor> storages;
  for (std::string line; std::getline(lines, line);) {
    std::istringstream words(line);
    std::string key;
    words >> key;
    if (key == "cache") {
      CacheSpec spec;
      std::string dtype;
      int64_t ndim;
      words >> spec.name >> dtype >> spec.fill >> ndim;
      spec.dtype = dtype_named(dtype);
      spec.shape = read_ints(words, ndim);
      package.cache.push_back(spec);
    } else if (key == "weight") {
      std::string program, fqn, record;
      int64_t offset, ndim;
      words >> program >> fqn >> record >> offset >> ndim;
      auto shape = read_ints(words, ndim);
      auto stride = read_ints(words, ndim);
      if (!storages.count(record)) {
        storages[record] = torch::pickle_load(read_record(reader, "data/weights/" + record)).toTensor();
      }
      package.weights[program][fqn] = storages[record].as_strided(shape, stride, offset);
    } else if (key == "eos_token_id") {
      for (int64_t id; words >> id;) package.eos_token_ids.push_back(id);
    } else if (!key.empty()) {
      words >> package.sizes[key];
    }
  }
  TORCH_CHECK(package.sizes["format"] == 1, "package format ", package.sizes["format"], ", this runner reads 1");
  return package;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " model.pt2 MAX_NEW_TOKENS ID [ID ...]\n";
    return 2;
  }
  const std::string path = argv[1];
  const int64_t max_new_tokens = std::stoll(argv[2]);
  std::vector<int64_t> prompt;
  for (int i = 3; i < argc; ++i) prompt.push_back(std::stoll(argv[i]));

  Package package = read_package(path);
  const int64_t batch = package.sizes["batch"], length = static_cast<int64_t>(prompt.size());
  if (package.sizes["image_input"]) {
    std::cerr << path << " takes pixel_values with every prompt; this example runs text packages\n";
    return 1;
  }
  if (length < package.sizes["min_prompt_len"] || length > package.sizes["max_prompt_len"]) {
    std::cerr << "the prompt has " << length << " tokens; the package takes " << package.sizes["min_prompt_len"]
              << " to " << package.sizes["max_prompt_len"] << "\n";
    return 1;
  }
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader prefill(path, "prefill"), decode(path, "decode");
  // user_managed: both programs use these tensors themselves, one copy of the weights
  prefill.load_constants(package.weights["prefill"], false, true, true);
  decode.load_constants(package.weights["decode"], false, true, true);

  std::vector<at::Tensor> cache;
  for (const auto& spec : package.cache) {
    cache.push_back(torch::full(spec.shape, spec.fill, torch::TensorOptions().dtype(spec.dtype)));
  }
  at::Tensor ids = torch::tensor(prompt, torch::kLong).repeat({batch, 1});
  at::Tensor mask = torch::ones_like(ids);
  at::Tensor kept = torch::empty({0, std::min(length, package.sizes["kept_len_max"])});
  std::vector<at::Tensor> inputs = {ids, mask, kept};
  inputs.insert(inputs.end(), cache.begin(), cache.end());
  at::Tensor logits = prefill.run(inputs)[0];

  at::Tensor eos = torch::tensor(package.eos_token_ids, torch::kLong);
  at::Tensor unfinished = torch::ones({batch}, torch::kBool);
  at::Tensor position = torch::full({batch, 1}, length - 1, torch::kLong);
  std::vector<at::Tensor> generated;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    at::Tensor next = logits.argmax(-1);
    if (eos.numel()) {
      next = torch::where(unfinished, next, package.sizes["pad_token_id"]);
      unfinished = unfinished & ~torch::isin(next, eos);
    }
    generated.push_back(next);
    if (step == max_new_tokens - 1 || (eos.numel() && !unfinished.any().item<bool>())) break;
    position = position + 1;
    std::vector<at::Tensor> step_inputs = {next.unsqueeze(1).contiguous(), position};
    step_inputs.insert(step_inputs.end(), cache.begin(), cache.end());
    logits = decode.run(step_inputs)[0];
  }
  at::Tensor tokens = torch::stack(generated, 1);
  for (int64_t row = 0; row < batch; ++row) {
    for (int64_t i = 0; i < tokens.size(1); ++i) std::cout << (i ? " " : "") << tokens[row][i].item<int64_t>();
    std::cout << "\n";
  }
  return 0;
}
