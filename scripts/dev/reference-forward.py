import struct, json, sys, numpy as np
path = sys.argv[1]
f = open(path,'rb').read()
p = 8
def u64():
    global p; v=struct.unpack_from('<Q',f,p)[0]; p+=8; return v
def u32():
    global p; v=struct.unpack_from('<I',f,p)[0]; p+=4; return v
def s():
    global p; n=u64(); v=f[p:p+n].decode(); p+=n; return v
def val(t):
    global p
    if t==8: return s()
    if t==9:
        et=u32(); n=u64(); return [val(et) for _ in range(n)]
    fmt={0:'<B',1:'<b',2:'<H',3:'<h',4:'<I',5:'<i',6:'<f',7:'<?',10:'<Q',11:'<q',12:'<d'}[t]
    v=struct.unpack_from(fmt,f,p)[0]; p+=struct.calcsize(fmt); return v
nt=u64(); nk=u64()
for i in range(nk):
    k=s(); t=u32(); val(t)
tensors={}
for i in range(nt):
    name=s(); nd=u32(); dims=[u64() for _ in range(nd)]; ty=u32(); off=u64(); tensors[name]=(dims,ty,off)
data=(p+31)//32*32
def load(name):
    dims,ty,off=tensors[name]; n=int(np.prod(dims)); o=data+off
    if ty==0: a=np.frombuffer(f,dtype='<f4',count=n,offset=o).astype(np.float64)
    elif ty==8:
        nb=n//32; raw=np.frombuffer(f,dtype=np.uint8,count=nb*34,offset=o).reshape(nb,34)
        d=raw[:,:2].copy().view('<f2').astype(np.float64); q=raw[:,2:].view(np.int8).astype(np.float64); a=(d*q).reshape(-1)
    elif ty==3:
        nb=n//32; raw=np.frombuffer(f,dtype=np.uint8,count=nb*20,offset=o).reshape(nb,20)
        d=raw[:,0:2].copy().view('<f2').astype(np.float64); m=raw[:,2:4].copy().view('<f2').astype(np.float64)
        qs=raw[:,4:]; lo=(qs&15).astype(np.float64); hi=(qs>>4).astype(np.float64)
        a=(np.concatenate([lo,hi],axis=1)*d+m).reshape(-1)
    else: raise Exception(ty)
    return a.reshape(list(reversed(dims)))
E=576; H=9; KV=3; HD=64; L=30; eps=1e-5; base=100000.0
emb=load('token_embd.weight')
def rms(x,w): return x/np.sqrt((x*x).mean(-1,keepdims=True)+eps)*w
def rope(x,pos):  # x [n, heads, hd]
    i=np.arange(0,HD,2); inv=base**(-i/HD); ang=pos[:,None]*inv[None,:]
    c=np.cos(ang)[:,None,:]; s_=np.sin(ang)[:,None,:]
    a=x[...,0::2]; b=x[...,1::2]; out=np.empty_like(x); out[...,0::2]=a*c-b*s_; out[...,1::2]=a*s_+b*c; return out
W={n:load(n) for n in tensors if n!='token_embd.weight'}
g=json.load(open('/work/shared/golden/smollm2-q4_1.llamacpp.json'))
diffs=[]
for case in g['cases'][:int(sys.argv[2])]:
    ids=case['prompt_ids']+[st['id'] for st in case['greedy'][:-1]]
    n=len(ids); pos=np.arange(n,dtype=np.float64)
    x=emb[ids]
    mask=np.triu(np.full((n,n),-np.inf),1)
    for l in range(L):
        h=rms(x,W[f'blk.{l}.attn_norm.weight'])
        q=(h@W[f'blk.{l}.attn_q.weight'].T).reshape(n,H,HD); k=(h@W[f'blk.{l}.attn_k.weight'].T).reshape(n,KV,HD); v=(h@W[f'blk.{l}.attn_v.weight'].T).reshape(n,KV,HD)
        q=rope(q,pos); k=rope(k,pos)
        k=np.repeat(k,3,axis=1); v=np.repeat(v,3,axis=1)
        sc=np.einsum('qhd,khd->hqk',q,k)/8.0+mask
        sc=np.exp(sc-sc.max(-1,keepdims=True)); sc/=sc.sum(-1,keepdims=True)
        o=np.einsum('hqk,khd->qhd',sc,v).reshape(n,E)
        x=x+o@W[f'blk.{l}.attn_output.weight'].T
        h=rms(x,W[f'blk.{l}.ffn_norm.weight'])
        gt=h@W[f'blk.{l}.ffn_gate.weight'].T; up=h@W[f'blk.{l}.ffn_up.weight'].T
        x=x+((gt/(1+np.exp(-gt)))*up)@W[f'blk.{l}.ffn_down.weight'].T
    x=rms(x,W['output_norm.weight']); logits=x@emb.T
    lp=logits-logits.max(-1,keepdims=True); lp=lp-np.log(np.exp(lp).sum(-1,keepdims=True))
    P=len(case['prompt_ids'])
    for i,st in enumerate(case['greedy']):
        diffs.append(abs(lp[P-1+i][st['id']]-st['top5'][0][1]))
d=np.sort(np.array(diffs)); print('f64 numpy vs golden: p50 %.4f p90 %.4f max %.4f within0.1 %.1f%%'%(d[len(d)//2],d[int(len(d)*0.9)],d[-1],100*(d<=0.1).mean()))
