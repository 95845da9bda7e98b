// Package reviews generates a small sentiment task in code: short product reviews labelled
// positive or negative ("the battery life is terrible", "i really love this keyboard"), with a
// word-level tokenizer over its closed vocabulary. Examples and benchmarks use it so that every
// fine-tuning method is compared on the same data without downloading anything.
//
// Some reviews negate their adjective ("the screen is not great"), so a model must read word
// order, not just count good and bad words.
package reviews

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/tensors"

	"peft/peft"
)

// Review is one labelled review.
type Review struct {
	Text string
	// Positive is the label: true for a positive review.
	Positive bool
}

// Label is 1 for a positive review, 0 for a negative one.
func (r Review) Label() int32 {
	if r.Positive {
		return 1
	}
	return 0
}

var (
	products = []string{"phone", "laptop", "keyboard", "headphones", "camera", "blender", "jacket", "backpack", "watch", "speaker"}
	aspects  = []string{"battery life", "screen", "sound", "price", "build quality", "delivery", "design", "fabric", "size", "support"}
	good     = []string{"great", "excellent", "amazing", "fantastic", "perfect", "solid", "good", "wonderful"}
	bad      = []string{"terrible", "awful", "poor", "horrible", "disappointing", "bad", "cheap", "useless"}
	loveVerb = []string{"love", "like", "enjoy", "recommend"}
	hateVerb = []string{"hate", "regret", "dislike", "returned"}
	intens   = []string{"", "really", "very", "quite", "so", "truly"}
	dets     = []string{"the", "this", "my"}
)

// Generate returns n reviews drawn deterministically from seed, about half of them positive.
func Generate(n int, seed uint64) []Review {
	rng := peft.NewRand(seed)
	out := make([]Review, n)
	for i := range out {
		out[i] = generate(rng)
	}
	return out
}

func pick(rng *rand.Rand, words []string) string { return words[rng.IntN(len(words))] }

func join(words ...string) string {
	return strings.Join(slices.DeleteFunc(words, func(w string) bool { return w == "" }), " ")
}

func generate(rng *rand.Rand) Review {
	positive := rng.IntN(2) == 1
	adjective := func(want bool) string {
		if want {
			return pick(rng, good)
		}
		return pick(rng, bad)
	}
	switch rng.IntN(4) {
	case 0: // "the battery life is really terrible"
		return Review{join(pick(rng, dets), pick(rng, aspects), "is", pick(rng, intens), adjective(positive)), positive}
	case 1: // "the screen is not great": negation flips the adjective
		return Review{join(pick(rng, dets), pick(rng, aspects), "is", "not", adjective(!positive)), positive}
	case 2: // "i really love this phone"
		verb := pick(rng, hateVerb)
		if positive {
			verb = pick(rng, loveVerb)
		}
		return Review{join("i", pick(rng, intens), verb, pick(rng, dets), pick(rng, products)), positive}
	default: // "great camera , would buy again"
		again := "would not buy again"
		if positive {
			again = "would buy again"
		}
		return Review{join(adjective(positive), pick(rng, products), ",", again), positive}
	}
}

// Special token ids of the Tokenizer.
const (
	PadID = 0
	BosID = 1
	UnkID = 2
)

// Tokenizer maps the task's words to ids: 0 is padding, 1 begins every sequence, 2 stands for
// unknown words, and the vocabulary's words follow in a fixed order.
type Tokenizer struct {
	ids   map[string]int32
	words []string
}

// NewTokenizer returns the tokenizer over the task's vocabulary.
func NewTokenizer() *Tokenizer {
	words := []string{"<pad>", "<s>", "<unk>"}
	seen := map[string]bool{}
	for _, list := range [][]string{products, aspects, good, bad, loveVerb, hateVerb, intens, dets,
		{"i", "is", "not", ",", "would", "buy", "again"}} {
		for _, phrase := range list {
			for _, w := range strings.Fields(phrase) {
				if !seen[w] {
					seen[w] = true
					words = append(words, w)
				}
			}
		}
	}
	t := &Tokenizer{ids: map[string]int32{}, words: words}
	for i, w := range words {
		t.ids[w] = int32(i)
	}
	return t
}

// VocabSize is the number of ids.
func (t *Tokenizer) VocabSize() int { return len(t.words) }

// Encode returns <s> and the ids of text's words, right-padded (or cut) to seqLen, and the mask
// (1 for real tokens).
func (t *Tokenizer) Encode(text string, seqLen int) (ids, mask []int32) {
	ids = make([]int32, seqLen)
	mask = make([]int32, seqLen)
	tokens := append([]string{"<s>"}, strings.Fields(strings.ToLower(text))...)
	for i := 0; i < seqLen && i < len(tokens); i++ {
		id, found := t.ids[tokens[i]]
		if !found {
			id = UnkID
		}
		ids[i], mask[i] = id, 1
	}
	return ids, mask
}

// Decode turns ids back into words, stopping at the first padding.
func (t *Tokenizer) Decode(ids []int32) string {
	var words []string
	for _, id := range ids {
		if id == PadID {
			break
		}
		if int(id) < len(t.words) && id != BosID {
			words = append(words, t.words[id])
		}
	}
	return strings.Join(words, " ")
}

// MaxWords is the longest review in words; sequences of MaxWords+1 tokens hold every review.
const MaxWords = 7

// Batches turns reviews into batches for the classifier (inputs: ids and mask [batch, seqLen]
// int32; labels: [batch, 1] int32). A last partial batch is dropped.
func Batches(t *Tokenizer, data []Review, batch, seqLen int) ([]peft.Batch, error) {
	if batch <= 0 || seqLen <= 0 {
		return nil, fmt.Errorf("reviews.Batches: batch (%d) and seqLen (%d) must be > 0", batch, seqLen)
	}
	if len(data) < batch {
		return nil, fmt.Errorf("reviews.Batches: %d reviews do not fill one batch of %d", len(data), batch)
	}
	var out []peft.Batch
	for start := 0; start+batch <= len(data); start += batch {
		ids := make([]int32, 0, batch*seqLen)
		mask := make([]int32, 0, batch*seqLen)
		labels := make([]int32, batch)
		for i, r := range data[start : start+batch] {
			rowIDs, rowMask := t.Encode(r.Text, seqLen)
			ids = append(ids, rowIDs...)
			mask = append(mask, rowMask...)
			labels[i] = r.Label()
		}
		out = append(out, peft.Batch{
			Inputs: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(ids, batch, seqLen), tensors.FromFlatDataAndDimensions(mask, batch, seqLen)},
			Labels: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(labels, batch, 1)},
		})
	}
	return out, nil
}

// LMBatches turns reviews into batches for next-token pretraining (inputs: ids and mask; labels:
// the same ids and mask, as peft.NextTokenLoss expects).
func LMBatches(t *Tokenizer, data []Review, batch, seqLen int) ([]peft.Batch, error) {
	batches, err := Batches(t, data, batch, seqLen)
	if err != nil {
		return nil, err
	}
	for i := range batches {
		batches[i].Labels = batches[i].Inputs
	}
	return batches, nil
}
