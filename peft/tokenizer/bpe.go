package tokenizer

import "unicode/utf8"

// mergeVal is a merge's rank (its index in the merges list) and the id of the
// token it produces.
type mergeVal struct{ rank, newID int32 }

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// candidate is a possible merge of the symbol at pos with the next one.
type candidate struct{ rank, pos, newID int32 }

func (a candidate) less(b candidate) bool {
	return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos)
}

// candHeap is a binary min-heap by (rank, pos).
type candHeap []candidate

func (h *candHeap) push(c candidate) {
	*h = append(*h, c)
	s := *h
	i := len(s) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !s[i].less(s[p]) {
			break
		}
		s[i], s[p] = s[p], s[i]
		i = p
	}
}

func (h *candHeap) pop() candidate {
	s := *h
	top := s[0]
	n := len(s) - 1
	s[0] = s[n]
	s = s[:n]
	i := 0
	for {
		l, r, m := 2*i+1, 2*i+2, i
		if l < n && s[l].less(s[m]) {
			m = l
		}
		if r < n && s[r].less(s[m]) {
			m = r
		}
		if m == i {
			break
		}
		s[i], s[m] = s[m], s[i]
		i = m
	}
	*h = s
	return top
}

// bpe appends the ids of one word to ids. It follows Hugging Face's BPE:
// each character becomes its vocabulary token, or with byte_fallback the
// <0xNN> tokens of its UTF-8 bytes, or the unk token (consecutive unks fused
// with fuse_unk); then the adjacent pair with the lowest merge rank is merged
// (leftmost on ties) until no pair has a merge. Symbols are a linked list and
// candidates a heap, so a word of n characters takes O(n log n).
func (t *Tokenizer) bpe(ids []int, word string) []int {
	if word == "" {
		return ids
	}
	if t.ignoreMerges {
		if id, ok := t.vocab[word]; ok {
			return append(ids, id)
		}
	}
	sym := make([]int32, 0, len(word))
	pendingUnk := false
	for i, r := range word {
		size := utf8.RuneLen(r)
		if r == utf8.RuneError {
			_, size = utf8.DecodeRuneInString(word[i:])
		}
		if id, ok := t.vocab[word[i:i+size]]; ok {
			if pendingUnk {
				sym = append(sym, int32(t.unkID))
				pendingUnk = false
			}
			sym = append(sym, int32(id))
			continue
		}
		if t.byteFallback && t.hasBytes(word[i:i+size]) {
			if pendingUnk {
				sym = append(sym, int32(t.unkID))
				pendingUnk = false
			}
			for j := i; j < i+size; j++ {
				sym = append(sym, t.byteIDs[word[j]])
			}
			continue
		}
		if t.unkID < 0 {
			continue // unreachable: Parse requires unk or a full byte fallback
		}
		if pendingUnk && !t.fuseUnk {
			sym = append(sym, int32(t.unkID))
		}
		pendingUnk = true
	}
	if pendingUnk {
		sym = append(sym, int32(t.unkID))
	}

	n := len(sym)
	if n > 1 && len(t.merges) > 0 {
		next := make([]int32, n)
		prev := make([]int32, n)
		dead := make([]bool, n)
		h := make(candHeap, 0, n)
		for i := range n {
			next[i] = int32(i + 1)
			prev[i] = int32(i - 1)
			if i+1 < n {
				if m, ok := t.merges[pairKey(sym[i], sym[i+1])]; ok {
					h.push(candidate{m.rank, int32(i), m.newID})
				}
			}
		}
		next[n-1] = -1
		for len(h) > 0 {
			c := h.pop()
			p := c.pos
			if dead[p] {
				continue
			}
			q := next[p]
			if q < 0 {
				continue
			}
			if m, ok := t.merges[pairKey(sym[p], sym[q])]; !ok || m.newID != c.newID {
				continue // stale candidate
			}
			sym[p] = c.newID
			dead[q] = true
			nq := next[q]
			next[p] = nq
			if nq >= 0 {
				prev[nq] = p
				if m, ok := t.merges[pairKey(sym[p], sym[nq])]; ok {
					h.push(candidate{m.rank, p, m.newID})
				}
			}
			if pp := prev[p]; pp >= 0 {
				if m, ok := t.merges[pairKey(sym[pp], sym[p])]; ok {
					h.push(candidate{m.rank, pp, m.newID})
				}
			}
		}
		for i := int32(0); i >= 0; i = next[i] {
			ids = append(ids, int(sym[i]))
		}
		return ids
	}
	for _, s := range sym {
		ids = append(ids, int(s))
	}
	return ids
}

// hasBytes reports whether every byte of s has a <0xNN> token.
func (t *Tokenizer) hasBytes(s string) bool {
	for i := 0; i < len(s); i++ {
		if t.byteIDs[s[i]] < 0 {
			return false
		}
	}
	return true
}
