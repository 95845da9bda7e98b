package llama

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
)

// The model families the decoder runs, by Hugging Face's model_type. They share one decoder and
// differ only in what Family lists.
const (
	FamilyLlama   = "llama"   // Llama 1–3.x, TinyLlama, SmolLM2, stories260K
	FamilyMistral = "mistral" // Mistral: sliding-window attention
	FamilyQwen2   = "qwen2"   // Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen: biases on q, k, v
	FamilyQwen3   = "qwen3"   // Qwen3: RMSNorm on each head of q and k before RoPE
)

// Family is what distinguishes a model family in the shared decoder, as transformers'
// modeling_<family>.py has it.
type Family struct {
	// Architecture is the class transformers builds for a causal LM ("LlamaForCausalLM").
	Architecture string
	// QKVBias and OBias put biases on the q, k, v and on the o projections; MLPBias on gate, up
	// and down.
	QKVBias, OBias, MLPBias bool
	// QKNorm applies an RMSNorm over each head of q and k (weights q_norm, k_norm [head_dim])
	// before the rotary embedding.
	QKNorm bool
	// SlidingWindow, when > 0, lets position i attend to keys j with i − window < j ≤ i.
	SlidingWindow int
}

// Family returns the differences of c's family from the plain Llama decoder.
func (c Config) Family() Family {
	switch c.ModelType {
	case FamilyMistral:
		return Family{Architecture: "MistralForCausalLM", SlidingWindow: c.SlidingWindow}
	case FamilyQwen2:
		return Family{Architecture: "Qwen2ForCausalLM", QKVBias: true}
	case FamilyQwen3:
		return Family{Architecture: "Qwen3ForCausalLM", QKVBias: c.AttentionBias, OBias: c.AttentionBias, QKNorm: true}
	}
	return Family{Architecture: "LlamaForCausalLM", QKVBias: c.AttentionBias, OBias: c.AttentionBias, MLPBias: c.MLPBias}
}

// RopeScaling is config.json's rope_scaling for the rope types implemented: "linear" (positions
// divided by Factor) and "llama3" (Llama 3.1's frequency-dependent scaling).
type RopeScaling struct {
	RopeType                      string  `json:"rope_type"`
	Factor                        float64 `json:"factor"`
	LowFreqFactor                 float64 `json:"low_freq_factor,omitempty"`
	HighFreqFactor                float64 `json:"high_freq_factor,omitempty"`
	OriginalMaxPositionEmbeddings int     `json:"original_max_position_embeddings,omitempty"`
}

// parseRopeScaling reads rope_scaling (null, or an object with rope_type or the older type),
// refusing the rope types not implemented.
func parseRopeScaling(raw json.RawMessage) (*RopeScaling, error) {
	if len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return nil, nil
	}
	var r struct {
		RopeScaling
		Type string `json:"type"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, fmt.Errorf("llama: config.json: rope_scaling: %w", err)
	}
	s := r.RopeScaling
	if s.RopeType == "" {
		s.RopeType = r.Type
	}
	switch s.RopeType {
	case "default":
		return nil, nil
	case "linear":
		if !(s.Factor > 0) {
			return nil, fmt.Errorf("llama: config.json: rope_scaling.factor must be > 0, got %g", s.Factor)
		}
	case "llama3":
		if !(s.Factor > 0) || !(s.LowFreqFactor > 0) || !(s.HighFreqFactor > s.LowFreqFactor) || s.OriginalMaxPositionEmbeddings <= 0 {
			return nil, fmt.Errorf("llama: config.json: rope_scaling of rope_type llama3 needs factor > 0, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0, got %s", raw)
		}
	default:
		return nil, fmt.Errorf("llama: config.json: rope_scaling.rope_type %q is not supported (supported: linear, llama3)", s.RopeType)
	}
	return &s, nil
}

// inverseFrequencies returns RoPE's inverse frequencies for head size hd, as transformers'
// modeling_rope_utils computes them for c's rope type.
func (c Config) inverseFrequencies(hd int) []float64 {
	freqs := make([]float64, hd/2)
	for i := range freqs {
		freqs[i] = 1 / math.Pow(c.RopeTheta, float64(2*i)/float64(hd))
	}
	s := c.RopeScaling
	switch {
	case s == nil:
	case s.RopeType == "linear":
		for i := range freqs {
			freqs[i] /= s.Factor
		}
	case s.RopeType == "llama3":
		old := float64(s.OriginalMaxPositionEmbeddings)
		lowWavelen, highWavelen := old/s.LowFreqFactor, old/s.HighFreqFactor
		for i, f := range freqs {
			wavelen := 2 * math.Pi / f
			switch {
			case wavelen < highWavelen: // high frequencies: kept
			case wavelen > lowWavelen: // low frequencies: scaled
				freqs[i] = f / s.Factor
			default: // in between: interpolated
				smooth := (old/wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor)
				freqs[i] = (1-smooth)*f/s.Factor + smooth*f
			}
		}
	}
	return freqs
}

// TokenIDs is config.json's form of a token id that may also be a list (Llama 3's eos_token_id
// [128001, 128008, 128009]): one id or several (one is written as a number, none as null).
type TokenIDs []int

// UnmarshalJSON reads an id, a list of ids, or null.
func (t *TokenIDs) UnmarshalJSON(data []byte) error {
	if string(bytes.TrimSpace(data)) == "null" {
		*t = nil
		return nil
	}
	var one int
	if err := json.Unmarshal(data, &one); err == nil {
		*t = TokenIDs{one}
		return nil
	}
	var many []int
	if err := json.Unmarshal(data, &many); err != nil {
		return fmt.Errorf("a token id or a list of token ids: %w", err)
	}
	*t = many
	return nil
}

// MarshalJSON writes one id as a number and several as a list.
func (t TokenIDs) MarshalJSON() ([]byte, error) {
	if len(t) == 1 {
		return json.Marshal(t[0])
	}
	return json.Marshal([]int(t))
}
